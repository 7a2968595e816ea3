"""The sections of bench.py, one module a concern; bench.py is the command line over them.

    harness.py          what every section uses: the repository root, /proc memory sampling, timing,
                        the rank launcher, the main job's flags, results stamped and printed
    fixtures.py         synthetic checkpoints (Meta and Hugging Face layouts), random models, random adapters
    machine.py          machine: MLX's and numpy's float32 matmul, the BLAS's kernels, memory bandwidth
    conversion.py       convert: convert.py on a synthetic checkpoint, time and peak memory
    training.py         train: LoRA / QLoRA steps on random models, and the same step in PyTorch + PEFT
    generation.py       generate: prompt and decode tokens/s per weight kind, beside the bandwidth bound
    peft_compare.py     peft: the default model's LoRA and QLoRA against PyTorch + PEFT on the shipped data
    preference.py       preference: a DPO and an ORPO step against supervised steps on the same pairs
    fusing.py           fuse: fuse.py's exports of a synthetic model, time and peak memory
    ranks.py            distributed and accumulation: the main job on two ranks, and in micro-batches
    evaluations/        qa.py (Q/A scores before and after fine-tuning) and llamacpp.py (the GGUF
                        exports in llama.cpp against this toolkit)

Each section module has run(args), which returns the results, and add_args(parser), its flags
(ranks.py has a pair for each of its two sections).
"""
