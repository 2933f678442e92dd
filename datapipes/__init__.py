"""gnn3d datapipes package."""
