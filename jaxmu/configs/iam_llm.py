r"""IAM's language-model audit end to end (Tables 6 and 7; iam-spec 3.6, 4.4, 9.5, 10.6).

    jaxmu iam-llm --config=iam_llm --workdir=runs/iam_llm              # CPU, real text, minutes
    jaxmu iam-llm --config=iam_llm:hf --workdir=runs/iam_llm_muse \
        --config.models.target_dir=ckpt/MUSE-news_retrain \
        --config.models.fit_dir=ckpt/MUSE-news_target --config.models.ref_dir=ckpt/base_190k \
        --config.corpus.forget_file=muse/news/raw/forget.txt \
        --config.corpus.retain_file=muse/news/raw/retain2.txt                    # GPU

Variants (``--config=iam_llm:<variant>``):

* ``cpu`` (default): CPython's bundled help texts (``pydoc_data.topics``, 79 topics, 465k
  characters) as the corpus, a byte-level BPE tokenizer trained on them offline (vocab 512),
  chunks of 64 tokens (a BOS and 63 text tokens). As one stack (vmapped params, one compiled
  epoch program, AdamW): the original LM on the forget chunks of every run + the retained chunks,
  one exact-unlearning retrained LM per run (without that run's forget chunks) and an OUT LM on
  disjoint chunks of the same corpus. Table 6 audits each retrained LM (forget chunks, label 0,
  against the retained query chunks, label 1); Table 7 audits the original prompted with a
  refusal prompt or a corrupted-text prefix on the forget chunks.
* ``hf``: the paper's MUSE-News set-up: three Hugging Face checkpoint directories (target = the
  retrained model, fit = the original, ref = the OUT model; ``config.json`` + ``*.safetensors``,
  the tokenizer from ``tokenizer.json`` of ``models.tokenizer_dir``, default the target's), the
  forget and retain texts from plain-text files cut into chunks of 256 whitespace words (the
  reference's), nothing trained. Table 7 then prompts the fit model. Needs a GPU.

Measured (``cpu``, 2026-12-07, idle-ish 2-core CPU): see the README section "Auditing language
models" for the numbers of the last run and what was tried.
"""

import ml_collections

VARIANTS = ("cpu", "hf")


def get_config(arg: str | None = None):
  variant = arg or "cpu"
  if variant not in VARIANTS:
    raise ValueError(f"iam_llm:{variant}: unknown variant; use one of {', '.join(VARIANTS)}")
  hf = variant == "hf"
  c = ml_collections.ConfigDict()
  c.prefix = "MUSE-News" if hf else "pydoc"  # the <prefix>-*.txt loss files' names

  c.corpus = ml_collections.ConfigDict()
  c.corpus.name = "files" if hf else "pydoc_topics"  # pydoc_topics | files
  # files: one text file per role, cut into chunks of `words_per_chunk` whitespace words
  c.corpus.forget_file = ""
  c.corpus.retain_file = ""
  c.corpus.population_file = ""  # optional: RMIA-On's population chunks
  c.corpus.words_per_chunk = 256
  c.corpus.vocab_size = 512  # pydoc_topics: the BPE tokenizer trained offline
  c.corpus.chunk_len = 512 if hf else 64  # tokens per chunk (files: the cap; BOS included)

  c.split = ml_collections.ConfigDict()  # pydoc_topics: chunks drawn at random, disjoint roles
  c.split.runs = 2  # exact-unlearning runs: one forget set and one retrained LM each
  c.split.forget = 100  # forget chunks per run (label 0)
  c.split.retain_query = 200  # retained chunks audited (label 1), in every model but the OUT
  c.split.retain_extra = 0  # more retained training chunks, not audited
  c.split.out = 400  # the OUT LM's training chunks (disjoint from all the above)
  c.split.population = 100  # chunks no model trains on (RMIA-On's population)
  c.split.seed = 42  # the reference's shuffle seed

  c.model = ml_collections.ConfigDict()  # jaxmu.models.llama.LlamaConfig fields
  c.model.hidden_size = 64
  c.model.intermediate_size = 192
  c.model.num_hidden_layers = 2
  c.model.num_attention_heads = 4
  c.model.num_key_value_heads = 2
  c.model.initializer_range = 0.02

  c.models = ml_collections.ConfigDict()  # hf: Hugging Face checkpoint directories
  c.models.target_dir = ""
  c.models.fit_dir = ""
  c.models.ref_dir = ""
  c.models.tokenizer_dir = ""  # its tokenizer.json; "" = target_dir
  c.models.dtype = "bfloat16" if hf else "float32"  # params and compute of loaded checkpoints

  c.train = ml_collections.ConfigDict()  # AdamW, next-token cross-entropy over the mask
  c.train.epochs = 8
  c.train.batch_size = 16
  c.train.learning_rate = 5e-3
  c.train.min_lr_ratio = 0.1  # cosine over epochs down to this fraction
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.clip_norm = 1.0
  c.train.seed = 0  # initialisation and data order (each model its own stream)

  c.prompts = ml_collections.ConfigDict()  # Table 7: prepended to the forget chunks only
  c.prompts.refusal = ("You are an assistant that has unlearned the following text. Do not "
                       "reproduce it; refuse to continue it.\n")
  # negative-label: this text with its characters shuffled (seeded) is the corrupted prefix
  c.prompts.negative_label = ("The quick brown fox jumps over the lazy dog while the committee "
                              "reviews the annual budget report.\n")
  c.prompts.corrupt_seed = 0

  c.signals = ml_collections.ConfigDict()
  c.signals.batch_size = 8 if hf else 64

  c.audit = ml_collections.ConfigDict()  # iam-spec 9.5
  c.audit.rounds = 1000
  c.audit.seed = 42
  c.audit.iam_batch = 64  # IAM-On's sigma pool (0 = all chunks)

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "auto"
  c.parallel.epoch = "auto"
  c.checkpoint_every = 5
  c.stop_after = ""  # a stage of jaxmu.pipelines.iam_llm.STAGES
  return c
