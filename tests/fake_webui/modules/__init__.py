"""Fake of the AUTOMATIC1111 stable-diffusion-webui v1.10.1 ``modules`` package, for tests (see ../README.md)."""
