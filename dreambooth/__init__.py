"""DreamBooth trainer for Stable Diffusion: the core package.

The core (everything except ``dreambooth.ui`` and ``dreambooth.webui``) imports neither gradio nor the WebUI's
``modules``; heavy libraries (torch, diffusers, transformers) are imported lazily inside the functions that need
them, so importing this package is cheap.
"""

__version__ = "0.5.0"
