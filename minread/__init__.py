"""minread: a compact, teachable implementation of READ (arXiv 2508.03457).

A reference face image and speech audio go in; a lip-synced talking-head video comes
out, generated clip by clip by a diffusion transformer in a compressed latent space.
One module per component; see README.md for the map.
"""

__version__ = "0.1.0"
