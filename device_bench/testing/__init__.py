"""Test helpers for firstkit.device_bench: a toy bundle builder and a loopback-only adbd."""
