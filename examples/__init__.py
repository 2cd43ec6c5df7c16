"""Small real apps built on the public API of the mesh (``from mesh import ...``)."""
