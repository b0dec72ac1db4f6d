"""The embedded default world: a seeded synthetic fact world and two tiny GPT-NeoX models
(pre-trained on its corpus, then fully fine-tuned on QA pairs), with known ground truth.

    world.py      WorldConfig, generate_world          relations.py  answer vocabularies, phrasings
    world_io.py   save_world, load_world               tokenizer.py  word-level tokenizer
    train.py      TrainConfig, pretrain, finetune      evaluate.py   evaluate_qa, relative_param_distance
    build.py      build_default_world (+ CLI: python -m msif_assets.demo.build --out DIR)
    settings.py   named sizes ("default", "tiny") used by the Dagster layer

Nothing is imported here, so importing a submodule never pulls in torch unless it needs it.
"""
