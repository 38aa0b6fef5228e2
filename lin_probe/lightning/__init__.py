"""The Lightning side: the callback and its TensorBoard panels (the only modules that import Lightning)."""
