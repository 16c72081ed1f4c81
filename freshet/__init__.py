"""Freshet: real-time recommendations from user-behaviour streams (PyFlink + TensorFlow)."""
__version__ = "0.1.0"
