"""Sections that score the default model's answers rather than time its steps.

    qa.py          qa: greedy chat answers to the dataset's questions, before and after fine-tuning
    llamacpp.py    llamacpp: the main job's GGUF exports in llama.cpp, their tokens against this toolkit's
"""
