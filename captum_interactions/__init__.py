#!/usr/bin/env python3
"""Second- and higher-order (interaction) attributions for PyTorch, as a Captum plugin."""

__version__ = "0.1.0"

# Public names. Each method module adds its import here.
