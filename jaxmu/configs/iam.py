"""The IAM audit for one dataset (iam-spec 5-7, 9; the reference recipe of iam-spec 6.2).

    jaxmu iam --config=iam:dataset=cifar100 --workdir=runs/iam_cifar100
    jaxmu iam --config=iam:dataset=digits --workdir=runs/iam_digits

Datasets: cifar10, cifar100, cinic10 (CIFAR-stem ResNet-18, SGD 0.1, batch 128, cosine T_max 200,
201 epochs, best-on-validation state), purchase100 (the Purchase MLP, lr 0.01; targets 100 epochs)
and the quick CPU variant `digits` (small CNN, 4 shadows, 2 seeds and 10 classes, 20 epochs, all 7
approximate methods; 2.5 minutes wall on an idle 2-core CPU on 2026-12-03; K = 1 AUCs for
set_random / class_percentage: IAM-On 0.67 / 0.73, LiRA-On 0.64 / 0.69, RMIA-On 0.62 / 0.70,
UnLeak 0.67 / 0.72). The reference runs need a GPU (estimated, not measured: 10 shadows, 1
original, 20 retrained and 10 ScoreUI ResNet-18s of 201 epochs on CIFAR, about 2 GPU-hours at an
effective 100 TFLOP/s; README "Reproducing IAM").

Options besides the dataset (comma separated, e.g. `dataset=cifar10,forget=class_percentage`):
  forget=set_random|class_percentage|one_class, or several joined by "+" (default
    set_random+class_percentage, Table 1's columns; class types loop over `forget_classes`, and
    every type shares the shadows and the original model)
  setting=exact|shifted|arch|incremental (iam-spec 7.1-7.4; see `setting` below)
  model=<jaxmu.models name> (default: the dataset's; Fig. 4's targets, iam-spec 6.1: ResNets with
    IAM's CIFAR stem (ResNet-50: 150 epochs), VGG-11/16 at lr 0.01, DenseNet-121)
  shadow=<jaxmu.models name> (setting=arch: the shadows' architecture, with IAM's options for it)
"""

import ml_collections

from jaxmu import data as data_lib
from jaxmu.methods import finetune

# iam-spec 5 and 6.2: shadow pool, shadow / target / ScoreUI epochs, learning rate, model.
REFERENCE = {
    "cifar10": dict(shadow_size=20000, epochs=201, target_epochs=201, score_epochs=170, lr=0.1,
                    model="resnet18"),
    "cifar100": dict(shadow_size=20000, epochs=201, target_epochs=201, score_epochs=201, lr=0.1,
                     model="resnet18"),
    "cinic10": dict(shadow_size=20000, epochs=201, target_epochs=201, score_epochs=201, lr=0.1,
                    model="resnet18"),
    "purchase100": dict(shadow_size=40000, epochs=201, target_epochs=100, score_epochs=71, lr=0.01,
                        model="purchase_mlp"),
}
ARGS = ("dataset", "forget", "setting", "model", "shadow")


def model_options(name: str) -> dict:
  """IAM's options of an architecture (iam-spec 6.1): the CIFAR stem for ResNets; torchvision's
  VGG-11/16 and DenseNet-121 (and the rest) take none."""
  return {"stem": "cifar"} if name.startswith("resnet") else {}


def get_config(arg: str | None = None):
  args = dict(kv.split("=", 1) for kv in (arg or "dataset=cifar10").split(","))
  unknown = set(args) - set(ARGS)
  if unknown:
    raise ValueError(f"unknown config arguments {sorted(unknown)}; use {', '.join(ARGS)}")
  dataset = args.get("dataset", "cifar10")
  if dataset not in (*REFERENCE, "digits"):
    raise ValueError(f"dataset={dataset!r}: choose one of {', '.join((*REFERENCE, 'digits'))}")
  quick = dataset == "digits"
  ref = REFERENCE.get(dataset, REFERENCE["cifar10"])
  recipe = data_lib.recipe(dataset, reference="iam")

  c = ml_collections.ConfigDict()
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = dataset
  c.dataset.data_dir = ""
  c.dataset.options = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = args.get("model", "small_cnn" if quick else ref["model"])
  c.model.options = ml_collections.ConfigDict(model_options(c.model.name))

  c.data = ml_collections.ConfigDict()
  c.data.mean = tuple(recipe.mean)
  c.data.std = tuple(recipe.std)
  c.data.augment = recipe.augment

  c.split = ml_collections.ConfigDict()  # iam-spec 5, 6.3
  c.split.shadow_size = 600 if quick else ref["shadow_size"]
  # Unlearning types, joined by "+" (iam-spec 7.1): Table 1 has set_random and class_percentage.
  c.split.forget = args.get("forget", "set_random+class_percentage")
  c.split.forget_size = 60 if quick else 500
  c.split.fixed_forget = 12 if quick else 100
  c.split.class_ratio = 0.1
  c.split.forget_classes = tuple(range(10))  # class types: one run per class (seed = seeds[0])
  c.split.shadow_fix = 40 if quick else 200
  c.split.shadow_train_frac = 0.8
  c.split.holdout_ratio = 0.2
  c.split.val_cap = 5000
  c.split.split_seed = 42
  c.seeds = (42, 43) if quick else tuple(range(42, 52))

  c.num_shadows = 4 if quick else 10  # K_max: 10 single-shadow groups (Table 1); 128 for Fig. 5
  c.train = ml_collections.ConfigDict()  # iam-spec 6.2
  resnet50 = c.model.name == "resnet50"  # Fig. 4's ResNet-50: 150 epochs (iam-spec 6.2)
  c.train.epochs = 20 if quick else 150 if resnet50 else ref["epochs"]  # shadows, shadow_origin
  c.train.target_epochs = 20 if quick else 150 if resnet50 else ref["target_epochs"]
  c.train.t_max = 0 if quick else 200  # cosine period in epochs (0 = the fit's length)
  c.train.batch_size = 64 if quick else 128
  c.train.learning_rate = 0.05 if quick else 0.01 if c.model.name.startswith("vgg") else ref["lr"]
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.optimizer = "sgd"
  c.train.schedule = "cosine"
  c.train.schedule_unit = "epoch"
  c.train.dtype = "float32"  # bfloat16: mixed precision on GPU (the reference trained in fp32)
  c.train.select_best = True  # keep each model's best-on-validation epoch (iam-spec 6.2)
  c.train.data_seed = 0
  c.original_per_seed = False  # one shared original (new_records.py) or one per seed (new_reseed)
  c.ref_in = ml_collections.ConfigDict()  # RMIA-On's IN model on the population (iam-spec 4.1)
  # quick: 60 epochs, as its population has only 180 samples (20 gave RMIA-On AUC 0.54, 60: 0.63)
  c.ref_in.epochs = 60 if quick else (100 if dataset == "purchase100" else 200)
  c.ref_in.batch_size = 64 if quick else 256

  c.signals = ml_collections.ConfigDict()
  c.signals.augmented_queries = False  # True: the reference's train-transform views (iam-spec 12.1)
  c.signals.view_seed = 0

  a, tau = {"cifar100": (0.6, 1.0), "purchase100": (0.2, 2.0)}.get(dataset, (0.33, 2.0))
  c.audit = ml_collections.ConfigDict()  # iam-spec 3.5, 4.1, 7.1
  c.audit.attacks = ("iam_on", "iam_off", "iam_gauss_prob", "iam_gauss_tsm", "iam_gauss_phi",
                     "iam_gauss_loss", "iam_on_wo_norm", "lira_on", "lira_off", "carlini_lira_on",
                     "carlini_lira_off", "rmia_on", "rmia_off", "emia_r", "emia_p", "update",
                     "unleak", "random")
  c.audit.k_sweep = ()  # () = 1, 2, 4, ... up to num_shadows
  c.audit.max_groups = 10  # min(K_max // K, max_groups) shadow groups per K
  c.audit.scoring_ablation = True  # Table 5: IAM's scoring function against alternatives
  c.audit.num_interp = 100
  c.audit.rmia_a = a
  c.audit.temperature = tau
  c.audit.gamma = 2.0
  # IAM-Off's Gumbel-map epsilons (audit's off_eps) and those normalising its target and shadow
  # signals (norm_eps); Purchase: the reference's (0.1, 1e-6) with (1e-2, 1e-5) (iam-spec 12.5).
  c.audit.off_eps = (0.1, 1e-6) if dataset == "purchase100" else (1e-2, 1e-5)
  c.audit.norm_eps = (1e-2, 1e-5)
  c.audit.seed = 0

  c.score_ui = ml_collections.ConfigDict()  # iam-spec 7.5
  c.score_ui.start_models = 2 if quick else 10  # shadows 0..start_models-1 keep training
  c.score_ui.attacks = ()  # () = audit.attacks
  c.score_ui.breaks = 4 if quick else 20
  c.score_ui.epochs = 8 if quick else ref["score_epochs"]

  c.approx = ml_collections.ConfigDict()  # iam-spec 7.6, 8, 9.4
  c.approx.methods = ("finetune", "iam_ascent", "boundary_expanding", "ssd", "iam_fisher",
                      "l_codec", "forsaken")
  hparams = {  # IAM's get_model_init settings (iam-spec 8) where the registry default differs:
      # FT as IAM runs it (finetune.IAM_HPARAMS: augmented retain loader, lr 0.01, batch 128)
      "finetune": dict(finetune.IAM_HPARAMS),
      "ssd": {"selection_weighting": 60.0 if dataset in ("cifar10", "cifar100") else 10.0}}
  if quick:  # a few seconds per method on CPU instead of minutes
    hparams.update({"l_codec": {"n_perturbations": 100}, "forsaken": {"num_epochs": 10}})
  c.approx.hparams = ml_collections.ConfigDict(hparams)
  # The reference as coded, where the paper's Table 8 numbers came from it (iam-spec 8, 12.21):
  # these run with faithful=True and are reported as "<method>@faithful".
  c.approx.faithful = ("iam_ascent", "boundary_expanding", "forsaken", "l_codec")
  # The score Table 8 reads: the reference's key for it, p_IPapprox_simp_online_wo_norm at
  # audit.off_eps (iam-spec 9.3, 12.19): IAM-On at the vision epsilons, (0.1, 1e-6) on Purchase.
  c.approx.attack = "iam_on_wo_norm"
  c.approx.seed = 0
  c.approx.margin = 0.1  # over/under-unlearning: mean membership this far from retrain's
  # "as retrain" also needs the distributions to agree: BinUI AUC within auc_margin of retrain's
  # and the two-sample KS statistic (method vs retrain, forgotten and retained samples apart) at
  # most ks_threshold.
  c.approx.auc_margin = 0.05
  c.approx.ks_threshold = 0.1

  # Epsilon / interpolation-count sensitivity of IAM-On/Off (iam-spec 10.5) over the saved
  # signals: every (eps1, eps2) pair x every A (plus audit.num_interp), on the first `groups`
  # K = 1 shadow groups (the reference: shadow [0]); eps = () skips it.
  c.sensitivity = ml_collections.ConfigDict()
  c.sensitivity.eps = tuple((e1, e2) for e1, e2s in ((0.1, (0.1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)),
                                                      (1e-2, (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)),
                                                      (1e-3, (1e-3, 1e-4, 1e-5, 1e-6)))
                            for e2 in e2s)
  c.sensitivity.num_interp = (2, 4, 8, 16, 32, 64, 128, 256)
  c.sensitivity.attacks = ("iam_on", "iam_off")
  c.sensitivity.groups = 1

  # Settings (iam-spec 7.1-7.4): exact = Table 1; arch = shadows of `shadow_model` (Fig. 4);
  # shifted = shadows trained on `shadow_dataset` (Table 3); incremental = the original and
  # retrained models of a finished run on old data (`incremental.base_workdir`, e.g. cifar10)
  # continue training on `incremental.pool_size` samples of this dataset (e.g. cinic10) for
  # train.target_epochs, audited with the old run's shadows (Table 4).
  c.setting = args.get("setting", "exact")
  shadow = args.get("shadow", "")  # arch: "" = c.model; its own options, none of the target's
  c.shadow_model = ml_collections.ConfigDict({"name": shadow, "options": model_options(shadow)})
  c.shadow_dataset = ml_collections.ConfigDict(  # shifted: e.g. cinic10 for cifar10 targets
      {"name": "", "data_dir": "", "options": {}, "shadow_size": 600 if quick else 20000})

  c.incremental = ml_collections.ConfigDict({"base_workdir": "", "pool_size": 300 if quick else 5000})
  # Reuse the shadows (shadow origin included) or the targets (originals, retrained, ref_in) of a
  # finished run with the same splits instead of training them, e.g. for the architecture matrix
  # of Fig. 4 (docs/iam.md): "" = train here.
  c.reuse = ml_collections.ConfigDict({"shadows": "", "targets": ""})

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "auto"  # auto | vmap | loop | sharded
  c.parallel.epoch = "auto"  # auto | scan | steps
  c.parallel.max_models_per_program = 0
  c.checkpoint_every = 5 if quick else 10
  c.stop_after = ""  # a stage of jaxmu.pipelines.iam.STAGES
  return c
