"""PD disaggregation with the mux memory: cluster launch helpers, transfer measurement (docs/pd.md)."""
