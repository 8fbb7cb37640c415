"""Small helpers every layer uses: atomic writes, error lines, dtype names, sizes, module trees, lazy imports."""
