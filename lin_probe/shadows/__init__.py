"""The linear shadow ``f_0 + Bᵀψ`` (optionally with per-example offsets) and its optimizer mirror."""
