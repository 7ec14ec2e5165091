"""Example models for the platform; `catalog` lists them and builds their images."""
