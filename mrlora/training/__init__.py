"""Flow-GRPO LoRA expert training (the Map step), split by concern.

``loop`` runs one expert from sampling to saved adapter; ``lora`` adds/saves the adapter; ``data`` decides which
prompts and noise seeds each step uses (deterministically, so a resumed run sees the same ones);
``checkpoint`` writes and restores step checkpoints through the run store; ``signals`` turns SIGUSR2/SIGTERM
into a checkpoint at the next step boundary; ``metrics`` writes metrics.jsonl and optional trackers.
The entry points users and the launcher call are in ``mrlora.train``.
"""
