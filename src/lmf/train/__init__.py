"""Trainers: one training loop shared by SFT, DPO and RM."""
