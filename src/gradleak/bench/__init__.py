"""Benchmarks: scripts that print a table and write JSON (``gradleak bench NAME``).

``step`` (where one CI-Net iteration's time goes, and the floor), ``quality`` (time to SSIM
0.80 / 0.90 / 0.95), ``scale`` (time and peak memory against batch size and resolution),
``memory`` (activation checkpointing and bf16 on and off), ``labels`` (label-recovery accuracy,
also under defenses), ``adaptive`` (the adaptive attacker's step cost per defense), ``landscape`` (how far from the private
batch the gradient still points the update's way).
Timings are measurements of the machine they run on: quote ratios measured in one run.
"""
