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

Measured (``cpu``, 2026-12-06, on a 2-core CPU shared with other jobs, load about 13: 1 min 11 s
wall, 29 s of CPU time; 4 LMs of 140k parameters, 5 epochs; 2 runs of 100 forget chunks against
200 retained chunks of 64 tokens).
Table 6 AUC, mean ± std over 1,000 bootstrap rounds, run 0 / run 1: IAM-On 0.971 ± 0.010 /
0.983 ± 0.008, LiRA-On 0.957 ± 0.013 / 0.942 ± 0.019, RMIA-On 0.935 ± 0.017 / 0.884 ± 0.022,
Ratio 0.918 / 0.942, Min-K% 0.885 / 0.951, Min-K%++ 0.881 / 0.947, Loss 0.807 / 0.884, Zlib
0.777 / 0.815, SURP 0.497 / 0.495, Bag-of-words 0.542 / 0.463. IAM-On >= LiRA-On in 84% / 100%
of the paired bootstrap rounds. Table 7 (prompted original): IAM-On AUC 0.798 refusal / 0.808
negative-label (a tiny LM's losses do move after an unseen prompt, a 7B model's hardly do);
forget chunks with normalised IAM > 0.4: 15% retrained, 70.5% refusal, 72% negative-label.

Whether IAM-On >= LiRA-On holds depends on the set-up (AUC run 0 / run 1, IAM-On vs LiRA-On):
  8 epochs, own initialisations, fewer steps for the retrained LMs: 0.960 / 0.961 vs 0.943 / 0.962;
    split / train seeds 7 / 1 with 200 forget chunks: 0.936 / 0.999 vs 0.947 / 0.994
  shared initialisation (train.shared_init), 8 epochs: 0.948 / 0.984 vs 0.959 / 0.981;
    seeds 7 / 1, 200 forget chunks: 0.982 / 0.987 vs 0.995 / 0.993 (LiRA-On ahead)
  + equal steps (train.equal_steps), 8 epochs: 0.997 / 0.999 vs 0.990 / 0.986 (saturating)
  + equal steps, 5 epochs (this config): 0.971 / 0.983 vs 0.957 / 0.942;
    seeds 7 / 1: 0.985 / 0.995 vs 0.432 / 0.459 (that original left its loss plateau late)
  IAM's sigma pooled over all chunks instead of 64 (audit.iam_batch=0): no change (±0.003).
IAM-On >= LiRA-On in 9 of 14 runs, in all 6 where every LM takes the same number of steps; with
retrained LMs that take fewer steps than the original (less trained), LiRA-On is ahead in 5 of 8.
2 epochs give AUCs of 0.6-0.7 for every attack, 20 epochs saturate them at about 1.0.
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
  c.train.epochs = 5
  c.train.batch_size = 16
  c.train.learning_rate = 5e-3
  c.train.min_lr_ratio = 0.1  # cosine over epochs down to this fraction
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.clip_norm = 1.0
  c.train.seed = 0  # initialisation and data order (each model its own stream)
  # One initialisation for every LM, as fine-tuned LLMs share their base model (the paper's
  # MUSE models): separately initialised tiny LMs leave the first loss plateau at different
  # epochs, and a retrained LM then differs from the original by far more than its data.
  c.train.shared_init = True
  # Every LM takes the original's number of steps per epoch (smaller sets cycle): a retrained LM
  # with fewer steps is less trained on its retained chunks too, which the attacks then read.
  c.train.equal_steps = True

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
