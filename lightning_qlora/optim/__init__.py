"""bitsandbytes (paged) optimizers by name, and rebuilding a torch optimizer as one (torch only)."""
