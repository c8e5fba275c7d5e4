"""Curvature: K-FAC factors of Conv2d/Linear layers and the curvature channel criteria built on them."""
