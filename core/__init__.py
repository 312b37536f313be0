"""The ground floor: workspace settings, the input contract, the privacy policy, shared names."""
