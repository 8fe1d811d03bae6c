"""MoE experts in arena slots: the expert cache mechanism and its pluggable policies."""
