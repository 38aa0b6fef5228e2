"""The Lightning-free monitor: probe set, checks, exit rule and the ``RegimeProbe`` that drives them."""
