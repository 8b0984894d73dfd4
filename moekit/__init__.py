"""moekit: Mixture-of-Experts multi-task and multi-modal learning for vision and medical imaging."""

__version__ = "0.1.0"
