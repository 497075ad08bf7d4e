"""lmf.data: dataset registry, format conversion, chat templates, tokenization, packing, caching, collators.

Entry points: ``lmf.data.template.get_template``, ``lmf.data.loader.get_dataset``,
``lmf.data.collator.SFTCollator`` / ``PairwiseCollator``, ``lmf.data_check.run_data_command``.
Nothing heavy is imported here.
"""
