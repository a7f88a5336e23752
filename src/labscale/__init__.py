"""labscale: can a small open model compete with a large closed one on your task, and at what cost?"""

__version__ = "0.1.0"
