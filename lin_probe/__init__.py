"""lin_probe: is your network still training like a linear model on its inputs?

Re-exports the public API (DESIGN §2) and nothing else.
"""
