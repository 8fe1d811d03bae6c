"""Engines that compute with weights held in the arena: OnnxEngine (ORT) and MoeLM (torch)."""
