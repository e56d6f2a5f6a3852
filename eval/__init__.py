"""Evaluation: generate images for a prompt set with a checkpoint, score them, and report.

Why a package of its own: evaluation runs on compute nodes as an sbatch array job (``launch.eval``) or as a
plain command, and it must produce exactly the same numbers either way. Generation is deterministic per
(prompt, sample) and batches never depend on how the work is sharded, so two shards give the same images as one.

Entry points: ``python -m eval.run`` (generate + score one shard, or everything), ``python -m eval.aggregate``
(merge finished shards into one result), ``python -m eval.report`` (Markdown/HTML report over several evals).
"""
