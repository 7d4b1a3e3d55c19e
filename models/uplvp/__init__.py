"""UPLVP (Zhang et al., arXiv 2405.13388): unsupervised pre-training of K-Net's kernels.

The paper's three parts, each in one place:

  §3.1 Masks Proposal          proposals/     unlabeled images + vocabulary -> pseudo masks
                                              (engines: offline MobileNetV2+MiniLM, clip
                                              MaskCLIP, grid/saliency baselines; run.py)
  §3.2 Prompt-Kernel Matching  prompts.py     pseudo mask -> prompt (box/mask pooling),
                                              cosine / fixed matching into kernels, dropout
  §3.3 Kernel Supervision      pretrain.py    set-prediction losses (nets/criterion.py) on
                                              the pseudo masks, the pre-training loop
  §4   Low-data fine-tuning    ../pipeline.py run_uplvp_pretraining -> run_finetune(init=...)
"""
