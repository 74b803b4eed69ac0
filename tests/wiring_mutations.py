"""Break each option's wiring, one line at a time, and run the fast tests that should catch it.

    python tests/wiring_mutations.py            # every break; prints a Markdown table
    python tests/wiring_mutations.py --only lr  # the breaks whose option contains "lr"

Each break replaces one snippet where fit()/Run/a command uses an option (passing the default, None
or 0 instead), runs the named tests (all in the fast loop: `pytest -m "not slow"`), and restores
the file. A break that no test catches is reported as MISSED and makes the exit status 1. Not a
test itself (it rewrites the package's files while it runs): run it on a clean checkout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
W = "tests/test_wiring.py::"
C = "tests/test_wiring_commands.py::"
IMB = "tests/test_imbalance.py::"


@dataclass
class Break:
    option: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


BREAKS = [
    # ---- train.py: fit(), open_run(), Run ----
    Break("--data", "flowers/training.py", "data = resolve_data(cfg.data)", "data = resolve_data(None)",
          (W + "test_data_output_dir_and_run_name_place_the_run",)),
    Break("--output-dir", "flowers/training.py", "output_dir = Path(cfg.output_dir)\n", "output_dir = Path('outputs')\n",
          (W + "test_data_output_dir_and_run_name_place_the_run",)),
    Break("--run-name", "flowers/training.py", "base = cfg.run_name or ", "base = None or ",
          (W + "test_data_output_dir_and_run_name_place_the_run",)),
    Break("--val-split", "flowers/training.py", "cfg.val_split, cfg.seed, cfg.strict", "0.2, cfg.seed, cfg.strict",
          (W + "test_val_split_and_seed_choose_the_held_out_photos",)),
    Break("--seed (split)", "flowers/training.py", "cfg.val_split, cfg.seed, cfg.strict", "cfg.val_split, 42, cfg.strict",
          (W + "test_val_split_and_seed_choose_the_held_out_photos",)),
    Break("--seed (data order: the raw seed)", "flowers/training.py", "        return data_order_seed(self.cfg.seed)",
          "        return self.cfg.seed", (W + "test_neighbouring_seeds_get_unrelated_data_orders",)),
    Break("--seed/epoch (augmentation, workers)", "flowers/data.py", "draws_for_image(self.seed, self.epoch, index)",
          "draws_for_image(self.seed, 0, index)",
          ("tests/test_review_fixes.py::test_large_seeds_augment_and_each_image_draws_its_row_of_the_epoch",)),
    Break("--seed/epoch (augmentation, device)", "flowers/device_data.py",
          "draws_for_epoch(self.seed, epoch, len(self.images))", "draws_for_epoch(self.seed, 0, len(self.images))",
          ("tests/test_device_pipeline.py::test_each_image_of_a_batch_gets_its_own_draw_and_the_draws_follow_seed_and_epoch",)),
    Break("--resume (old augmentation draws)", "flowers/resume.py", "if draws != AUGMENTATION_DRAWS:", "if False:",
          ("tests/test_training_fixes.py::test_a_run_saved_with_the_old_augmentation_draws_is_refused_in_one_line",)),
    Break("--resize-from", "flowers/data.py", "training_sizes(cfg.image_size, cfg.resize_from, cfg.epochs)",
          "training_sizes(cfg.image_size, 0, cfg.epochs)",
          (W + "test_resize_from_grows_the_training_crops_and_keeps_validation_at_image_size",)),
    Break("--resize-from (workers)", "flowers/data.py", "cfg.seed, sizes)", "cfg.seed)",
          (W + "test_resize_from_grows_the_training_crops_and_keeps_validation_at_image_size",)),
    Break("--resize-from (device)", "flowers/data.py", "dd.TrainPixels(train_images, sizes,",
          "dd.TrainPixels(train_images, cfg.image_size,",
          (W + "test_resize_from_grows_the_training_crops_and_keeps_validation_at_image_size",)),
    Break("--crop-scale/--affine/--colour-jitter (workers)", "flowers/data.py",
          "train_transform(cfg.image_size, strength=augment_strength(cfg))", "train_transform(cfg.image_size)",
          (W + "test_crop_scale_affine_and_colour_jitter_set_the_augmentation",)),
    Break("--crop-scale/--affine/--colour-jitter (device)", "flowers/data.py",
          "cfg.channels_last, augment_strength(cfg))", "cfg.channels_last)", (W + "test_crop_scale_affine_and_colour_jitter_set_the_augmentation",)),
    Break("--crop-scale", "flowers/data.py", "crop_scale=cfg.crop_scale,", "crop_scale=0.08,", (W + "test_crop_scale_affine_and_colour_jitter_set_the_augmentation",)),
    Break("--affine", "flowers/data.py", "affine=cfg.affine,", "affine=True,", (W + "test_crop_scale_affine_and_colour_jitter_set_the_augmentation",)),
    Break("--colour-jitter", "flowers/data.py", "colour_jitter=cfg.colour_jitter)", "colour_jitter=True)", (W + "test_crop_scale_affine_and_colour_jitter_set_the_augmentation",)),
    Break("--resize-from (history)", "flowers/training.py", '"image_size": self.sizes[epoch - 1],',
          '"image_size": self.cfg.image_size,', (W + "test_resize_from_is_in_the_history_with_the_images_seen",)),
    Break("--val-tta", "flowers/training.py", 'desc="validate", channels_last=cfg.channels_last,\n                       tta=cfg.val_tta)',
          'desc="validate", channels_last=cfg.channels_last,\n                       tta="none")',
          ("tests/test_tta.py::test_val_tta_flip_validates_with_the_mirror_and_eval_tta_flip_reproduces_it",)),
    Break("--strict", "flowers/training.py", "cfg.val_split, cfg.seed, cfg.strict", "cfg.val_split, cfg.seed, False",
          (W + "test_strict_refuses_a_folder_with_a_broken_photo",)),
    Break("--weights", "flowers/training.py", "start.init_path else cfg.weights, cfg.arch)",
          "start.init_path else 'none', cfg.arch)", (W + "test_weights_and_init_from_load_their_weights",)),
    Break("--init-from", "flowers/training.py",
          "load_init_weights(model, start.init_path, splits.class_names) if start.init_path else None", "None",
          (W + "test_weights_and_init_from_load_their_weights",)),
    Break("--cache-resized", "flowers/training.py", "decode_once = cfg.cache_resized or", "decode_once = False or",
          (W + "test_pipeline_device_and_cache_resized_change_where_pixels_come_from",)),
    Break("--arch", "flowers/training.py", "dropout=cfg.dropout, arch=cfg.arch)", "dropout=cfg.dropout, arch='resnet18')",
          (W + "test_arch_dropout_and_channels_last_build_the_model",)),
    Break("--dropout", "flowers/training.py", "dropout=cfg.dropout, arch=cfg.arch)", "dropout=0.0, arch=cfg.arch)",
          (W + "test_arch_dropout_and_channels_last_build_the_model",)),
    Break("--channels-last", "flowers/training.py", "        if cfg.channels_last:\n            model = model.to(",
          "        if False:\n            model = model.to(", (W + "test_arch_dropout_and_channels_last_build_the_model",)),
    Break("--optimizer/--lr/--momentum/--weight-decay", "flowers/training.py",
          "build_optimizer(cfg, parameter_groups(cfg, model))", "build_optimizer(TrainConfig(), parameter_groups(cfg, model))",
          (W + "test_optimizer_lr_momentum_and_weight_decay_reach_the_optimizer",)),
    Break("--lr", "flowers/optim.py", "torch.optim.SGD(params, lr=cfg.lr,", "torch.optim.SGD(params, lr=2e-3,",
          (W + "test_optimizer_lr_momentum_and_weight_decay_reach_the_optimizer",)),
    Break("--momentum", "flowers/optim.py", "momentum=cfg.momentum,", "momentum=0.9,",
          (W + "test_optimizer_lr_momentum_and_weight_decay_reach_the_optimizer",)),
    Break("--weight-decay", "flowers/recipe.py", "cfg.weight_decay if decayed else 0.0", "0.05 if decayed else 0.0",
          (W + "test_optimizer_lr_momentum_and_weight_decay_reach_the_optimizer",)),
    Break("--ema-decay", "flowers/training.py", "WeightEMA(model, cfg.ema_decay) if", "WeightEMA(model, 0.999) if",
          (W + "test_ema_decay_and_the_ema_follows_optimizer_steps_only",)),
    Break("--ema-decay (updated on every batch)", "flowers/training.py",
          "        if stepped:\n            progress.global_step += 1\n            if self.ema is not None:",
          "        if stepped:\n            progress.global_step += 1\n        if self.ema is not None:",
          (W + "test_ema_decay_and_the_ema_follows_optimizer_steps_only",)),
    Break("--scheduler/--epochs/--warmup-epochs/--step-size/--gamma", "flowers/training.py",
          "scheduler = build_scheduler(cfg, optimizer,", "scheduler = build_scheduler(TrainConfig(), optimizer,",
          (W + "test_step_schedule_with_warmup_follows_its_options",
           W + "test_cosine_onecycle_and_no_schedule_span_the_run")),
    Break("--grad-accum-steps (accelerator)", "flowers/training.py",
          "make_accelerator(start.shuffle_seed, cfg.grad_accum_steps,", "make_accelerator(start.shuffle_seed, 1,",
          (W + "test_grad_accum_steps_reach_the_accelerator_and_the_schedule",)),
    Break("--grad-accum-steps (schedule)", "flowers/training.py",
          "math.ceil(len(train_loader) / cfg.grad_accum_steps)", "len(train_loader)",
          (W + "test_grad_accum_steps_reach_the_accelerator_and_the_schedule",)),
    Break("--step-size", "flowers/optim.py", "steps_per_epoch, cfg.step_size, cfg.gamma)", "steps_per_epoch, 7, cfg.gamma)",
          (W + "test_step_schedule_with_warmup_follows_its_options",)),
    Break("--gamma", "flowers/optim.py", "steps_per_epoch, cfg.step_size, cfg.gamma)", "steps_per_epoch, cfg.step_size, 0.1)",
          (W + "test_step_schedule_with_warmup_follows_its_options",)),
    Break("--warmup-epochs", "flowers/optim.py", "    warmup_epochs = cfg.warmup_epochs\n", "    warmup_epochs = 0\n",
          (W + "test_step_schedule_with_warmup_follows_its_options",)),
    Break("--epochs (schedule)", "flowers/optim.py", "    total = cfg.epochs * steps_per_epoch", "    total = 25 * steps_per_epoch",
          (W + "test_cosine_onecycle_and_no_schedule_span_the_run",)),
    Break("--epochs (the loop)", "flowers/training.py", "range(run.progress.epoch + 1, run.cfg.epochs + 1)",
          "range(run.progress.epoch + 1, 25 + 1)",
          ("tests/test_end_to_end.py::test_training_writes_best_and_last_with_self_contained_metadata",)),
    Break("--freeze-backbone N", "flowers/optim.py", "backbone.frozen_steps = max(0, cfg.freeze_backbone) * steps_per_epoch",
          "backbone.frozen_steps = 0", (W + "test_freeze_backbone_for_some_epochs_or_the_whole_run",)),
    Break("--freeze-backbone (whole run)", "flowers/training.py", "parameter_groups(cfg, model))",
          "parameter_groups(dataclasses.replace(cfg, freeze_backbone=0), model))",
          (W + "test_freeze_backbone_for_some_epochs_or_the_whole_run",)),
    Break("--label-smoothing", "flowers/training.py", "loss_fn=make_loss(cfg, _class_weights(cfg, splits))",
          "loss_fn=make_loss(TrainConfig(), _class_weights(cfg, splits))",
          (W + "test_label_smoothing_is_in_the_loss", W + "test_recipe_report_is_adam_with_a_step_schedule_and_no_smoothing")),
    Break("--mixup/--cutmix (mix=None)", "flowers/training.py", "mix=make_batch_transform(cfg, len(splits.class_names)),",
          "mix=None,", (W + "test_mixup_and_cutmix_mix_the_batches_with_their_alphas",)),
    Break("--mixup + --cutmix (CutMix never chosen)", "flowers/recipe.py",
          "return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)", "return mixers[0]",
          (W + "test_mixup_and_cutmix_mix_the_batches_with_their_alphas",)),
    Break("--early-stopping-patience", "flowers/training.py", "stopper=EarlyStopping(cfg.early_stopping_patience),",
          "stopper=EarlyStopping(0),", (W + "test_early_stopping_patience_stops_the_run",)),
    Break("--on-nan", "flowers/training.py", "NonFiniteGuard(accelerator, cfg.on_nan, run_dir)",
          "NonFiniteGuard(accelerator, 'stop', run_dir)", (W + "test_on_nan_reaches_the_guard",)),
    Break("the loop's totals (float64)", "flowers/training.py",
          "totals=torch.zeros(3, device=accelerator.device, dtype=torch.float32),",
          "totals=torch.zeros(3, device=accelerator.device, dtype=torch.float64),",
          (W + "test_the_loop_sums_in_float32_and_validates_on_the_validation_split",)),
    Break("the validation loader (built from the training split)", "flowers/data.py",
          "val = make_loader(with_transform(splits.val,", "val = make_loader(with_transform(splits.train,",
          (W + "test_the_loop_sums_in_float32_and_validates_on_the_validation_split",)),
    Break("--save-every-steps", "flowers/training.py", "every = self.accelerator, self.progress, self.cfg.save_every_steps",
          "every = self.accelerator, self.progress, 0", (W + "test_save_every_steps_saves_last_mid_epoch",)),
    Break("--resume", "flowers/training.py", "        if cfg.resume:\n            resume_dir = find_run(",
          "        if False:\n            resume_dir = find_run(", (W + "test_resume_continues_the_saved_run",)),
    Break("--report-to", "flowers/training.py", "tracking.tracker_names(cfg.report_to)", "tracking.tracker_names('none')",
          (W + "test_report_to_project_tags_and_group_reach_the_trackers",)),
    Break("--wandb-project", "flowers/training.py", "project=cfg.wandb_project,", "project=None,",
          (W + "test_report_to_project_tags_and_group_reach_the_trackers",)),
    Break("--tags", "flowers/training.py", "tags=cfg.tags,", "tags=None,",
          (W + "test_report_to_project_tags_and_group_reach_the_trackers",)),
    Break("--group", "flowers/training.py", "group=cfg.group,", "group=None,",
          (W + "test_report_to_project_tags_and_group_reach_the_trackers",)),
    Break("--compile", "flowers/training.py", "project_dir=cfg.output_dir, compile=cfg.compile)",
          "project_dir=cfg.output_dir, compile=False)", (W + "test_compile_asks_accelerate_for_torch_compile",)),
    Break("--batch-size", "flowers/data.py", "train = make_loader(augmented, cfg.batch_size, shuffle=True,",
          "train = make_loader(augmented, 32, shuffle=True,",
          (W + "test_batch_size_image_size_and_workers_shape_the_batches",)),
    # the training crops' size reaches the workers through each epoch's size (training_sizes), not
    # through train_transform's own image_size, a fallback no run uses (breaking it changes nothing)
    Break("--image-size", "flowers/data.py", "sizes = training_sizes(cfg.image_size,", "sizes = training_sizes(224,",
          (W + "test_batch_size_image_size_and_workers_shape_the_batches",)),
    Break("--workers", "flowers/data.py", "workers = cfg.workers if cfg.workers >= 0 else", "workers = 0 if cfg.workers >= 0 else",
          (W + "test_batch_size_image_size_and_workers_shape_the_batches",)),
    Break("--pipeline", "flowers/data.py", "pipeline = resolve_pipeline(cfg.pipeline, device.type)",
          "pipeline = resolve_pipeline('auto', device.type)",
          (W + "test_pipeline_device_and_cache_resized_change_where_pixels_come_from",)),
    Break("--device-cache", "flowers/data.py", "accelerator.device, cfg.device_cache, reserve_bytes)",
          "accelerator.device, 'auto', reserve_bytes)", (W + "test_device_cache_chooses_where_the_decoded_photos_live",)),
    Break("--exclude", "flowers/training.py", "read_edits(self.cfg.exclude, self.cfg.relabel,",
          "read_edits(None, self.cfg.relabel,", (W + "test_exclude_relabel_and_duplicate_distance_shape_the_split",)),
    Break("--relabel", "flowers/training.py", "read_edits(self.cfg.exclude, self.cfg.relabel,",
          "read_edits(self.cfg.exclude, None,", (W + "test_exclude_relabel_and_duplicate_distance_shape_the_split",)),
    Break("--duplicate-distance", "flowers/training.py", "duplicate_distance=self.cfg.duplicate_distance,",
          "duplicate_distance=5,", (W + "test_exclude_relabel_and_duplicate_distance_shape_the_split",)),
    Break("--recipe", "flowers/config.py", 'values = {**RECIPES.get(values.get("recipe") or "default", {}), **values}',
          'values = {**RECIPES.get("default", {}), **values}',
          (W + "test_recipe_report_is_adam_with_a_step_schedule_and_no_smoothing",
           W + "test_recipe_scratch_is_random_weights_a_growing_size_and_a_milder_augmentation")),
    Break("--config", "flowers/config.py", '        values.update(load_yaml(given["config"]))\n', "        pass\n",
          (W + "test_a_config_file_sets_options_and_flags_win",)),
    # ---- eval.py ----
    Break("eval --ckpt", "flowers/evaluation.py", "checkpoint.resolve(cfg.ckpt, cfg.output_dir)",
          "checkpoint.resolve('best', cfg.output_dir)", (C + "test_eval_checkpoint_split_top_k_mistakes_batch_size_and_workers",)),
    Break("eval --output-dir", "flowers/evaluation.py", "checkpoint.resolve(cfg.ckpt, cfg.output_dir)",
          "checkpoint.resolve(cfg.ckpt, 'outputs')", (C + "test_eval_output_dir_names_where_the_runs_are",)),
    Break("eval --data", "flowers/evaluation.py", "    source = cfg.data or data[\"source\"]", "    source = data[\"source\"]",
          (C + "test_eval_data_and_strict_evaluate_another_folder",)),
    Break("eval --split", "flowers/evaluation.py", "split = cfg.split or (", "split = None or (",
          (C + "test_eval_checkpoint_split_top_k_mistakes_batch_size_and_workers",)),
    Break("eval --strict", "flowers/evaluation.py", "dataset, names = full_dataset(cfg.data, cfg.strict)",
          "dataset, names = full_dataset(cfg.data, False)", (C + "test_eval_data_and_strict_evaluate_another_folder",)),
    Break("eval --batch-size", "flowers/evaluation.py", "cfg.batch_size or int(train_cfg", "None or int(train_cfg",
          (C + "test_eval_checkpoint_split_top_k_mistakes_batch_size_and_workers",)),
    Break("eval --workers", "flowers/evaluation.py", "workers = cfg.workers if cfg.workers >= 0 else",
          "workers = 0 if cfg.workers >= 0 else", (C + "test_eval_checkpoint_split_top_k_mistakes_batch_size_and_workers",)),
    Break("eval --top-k", "flowers/evaluation.py", "top_k=cfg.top_k, losses=out.losses", "top_k=2, losses=out.losses",
          (C + "test_eval_checkpoint_split_top_k_mistakes_batch_size_and_workers",)),
    Break("eval --mistakes", "flowers/evaluation.py", "class_names, cfg.mistakes)", "class_names, 16)",
          (C + "test_eval_checkpoint_split_top_k_mistakes_batch_size_and_workers",)),
    Break("eval --mixed-precision", "flowers/evaluation.py", "    if cfg.mixed_precision:\n        return cfg.mixed_precision",
          "    if None:\n        return cfg.mixed_precision", (C + "test_eval_tta_eval_size_and_precision_change_the_forward_pass",)),
    Break("eval --tta", "flowers/evaluation.py", "channels_last=channels_last, tta=cfg.tta)",
          "channels_last=channels_last, tta='none')", (C + "test_eval_tta_eval_size_and_precision_change_the_forward_pass",)),
    Break("eval --eval-size", "flowers/evaluation.py", "    return cfg.eval_size or int(meta[\"image_size\"])",
          "    return None or int(meta[\"image_size\"])", (C + "test_eval_tta_eval_size_and_precision_change_the_forward_pass",)),
    Break("eval --calibrate", "flowers/evaluation.py", "    if cfg.calibrate:", "    if False:",
          (C + "test_eval_calibrate_writes_the_temperature_into_the_checkpoint",)),
    # ---- predict ----
    Break("predict IMAGE_OR_FOLDER", "flowers/predict.py", "_batches(list(collect_inputs(cfg.inputs)), cfg.batch_size)",
          "_batches(list(collect_inputs([])), cfg.batch_size)", (C + "test_predict_inputs_checkpoint_top_k_and_batch_size",)),
    Break("predict --ckpt", "flowers/predict.py", "checkpoint.resolve(cfg.ckpt, cfg.output_dir)",
          "checkpoint.resolve('best', cfg.output_dir)", (C + "test_predict_uses_the_checkpoint_it_is_given",)),
    Break("predict --output-dir", "flowers/predict.py", "checkpoint.resolve(cfg.ckpt, cfg.output_dir)",
          "checkpoint.resolve(cfg.ckpt, 'outputs')", (C + "test_predict_inputs_checkpoint_top_k_and_batch_size",)),
    Break("predict --top-k", "flowers/predict.py", "k = min(cfg.top_k, len(class_names))", "k = min(2, len(class_names))",
          (C + "test_predict_inputs_checkpoint_top_k_and_batch_size",)),
    Break("predict --batch-size", "flowers/predict.py", "_batches(list(collect_inputs(cfg.inputs)), cfg.batch_size)",
          "_batches(list(collect_inputs(cfg.inputs)), 32)", (C + "test_predict_inputs_checkpoint_top_k_and_batch_size",)),
    Break("predict --tta", "flowers/predict.py", "torch.stack(tensors).to(device), cfg.tta)",
          "torch.stack(tensors).to(device), 'none')", (C + "test_predict_tta_and_eval_size_change_the_probabilities",)),
    Break("predict --eval-size", "flowers/predict.py", "size = cfg.eval_size or", "size = None or",
          (C + "test_predict_tta_and_eval_size_change_the_probabilities",)),
    Break("predict --reject-below", "flowers/predict.py", "prediction.answer = answer(prediction.top, cfg.reject_below)",
          "prediction.answer = answer(prediction.top, None)", (C + "test_predict_reject_below_and_output",)),
    Break("predict --output", "flowers/predict.py", "    if cfg.output:", "    if None:",
          (C + "test_predict_reject_below_and_output",)),
    # ---- export ----
    Break("export --ckpt", "flowers/export.py", "checkpoint.resolve(cfg.ckpt, cfg.output_dir)",
          "checkpoint.resolve('best', cfg.output_dir)", (C + "test_export_format_out_and_checkpoint",)),
    Break("export --output-dir", "flowers/export.py", "checkpoint.resolve(cfg.ckpt, cfg.output_dir)",
          "checkpoint.resolve(cfg.ckpt, 'outputs')", (C + "test_export_format_out_and_checkpoint",)),
    Break("export --format", "flowers/export.py", "path = out_dir / FILE_NAMES[cfg.format]", "path = out_dir / FILE_NAMES['onnx']",
          (C + "test_export_format_out_and_checkpoint",)),
    Break("export --out", "flowers/export.py", "out_dir = Path(cfg.out) if cfg.out else", "out_dir = Path(cfg.out) if None else",
          (C + "test_export_format_out_and_checkpoint",)),
    # ---- crossval (train.py's options reach each fold's fit(): the same open_run) ----
    Break("crossval --folds", "flowers/crossval.py", "return fit(train_cfg, fold=(number, cfg.folds))",
          "return fit(train_cfg, fold=(number, 5))",
          (C + "test_crossval_folds_train_one_model_per_fold_and_predict_every_image_once",)),
    Break("label_issues --filter-by", "flowers/label_issues.py", "rank_label_issues(labels, probs, filter_by=cfg.filter_by)",
          "rank_label_issues(labels, probs, filter_by='prune_by_noise_rate')",
          (C + "test_crossval_folds_train_one_model_per_fold_and_predict_every_image_once",)),
    Break("label_issues --show", "flowers/label_issues.py", "plot_gallery(rows[:cfg.show], source,",
          "plot_gallery(rows[:24], source,", (C + "test_crossval_folds_train_one_model_per_fold_and_predict_every_image_once",)),
    Break("label_issues FOLDER", "flowers/label_issues.py", "    folder = Path(cfg.folder).expanduser()\n",
          "    folder = Path('outputs').expanduser()\n",
          (C + "test_crossval_folds_train_one_model_per_fold_and_predict_every_image_once",)),
    # ---- compare ----
    Break("compare --group", "flowers/compare.py", "runs = find_runs(cfg.output_dir, cfg.group)",
          "runs = find_runs(cfg.output_dir, 'None')", (C + "test_compare_group_output_dir_out_and_the_chain_of_stages",)),
    Break("compare --output-dir", "flowers/compare.py", "runs = find_runs(cfg.output_dir, cfg.group)",
          "runs = find_runs('outputs', cfg.group)", (C + "test_compare_group_output_dir_out_and_the_chain_of_stages",)),
    Break("compare --out", "flowers/compare.py", "return Path(cfg.out) if cfg.out else", "return Path(cfg.out) if None else",
          (C + "test_compare_group_output_dir_out_and_the_chain_of_stages",)),
    Break("compare (a chain of 3 stages)", "flowers/compare.py",
          "return offset(parent, seen | {parent.name}) + int(init.get(\"epoch\") or 0)", "return int(init.get(\"epoch\") or 0)",
          (C + "test_compare_group_output_dir_out_and_the_chain_of_stages",)),
    Break("compare --wandb-entity", "flowers/compare.py", "entity = cfg.wandb_entity or", "entity = None or",
          (C + "test_compare_wandb_entity_and_project_reach_the_report",)),
    Break("compare --wandb-project", "flowers/compare.py", "return cfg.wandb_project or project_name(",
          "return None or project_name(", (C + "test_compare_wandb_entity_and_project_reach_the_report",)),
    # ---- imbalance: --class-weights, --sampler (tests/test_imbalance.py) ----
    Break("--class-weights", "flowers/training.py", "loss_fn=make_loss(cfg, _class_weights(cfg, splits))",
          "loss_fn=make_loss(cfg, None)",
          (IMB + "test_class_weights_auto_weights_the_loss_by_inverse_training_frequency",)),
    Break("--class-weights (the training split's counts)", "flowers/training.py",
          "balance.split_labels(splits.train)", "balance.split_labels(splits.val)",
          (IMB + "test_class_weights_come_from_the_training_split_not_the_validation_split",)),
    Break("--sampler (workers)", "flowers/data.py", 'if cfg.sampler == "balanced" else None)', 'if False else None)',
          (IMB + "test_sampler_balanced_draws_every_class_equally_often_as_a_function_of_seed_and_epoch",)),
    Break("--sampler (device)", "flowers/data.py", "drop_last=drop_last,\n                                sampler=cfg.sampler)",
          "drop_last=drop_last)",
          (IMB + "test_sampler_balanced_draws_every_class_equally_often_as_a_function_of_seed_and_epoch",)),
    Break("--sampler (its epoch)", "flowers/balance.py", "self.seed, self.dataset.epoch)", "self.seed, 0)",
          (IMB + "test_sampler_balanced_draws_every_class_equally_often_as_a_function_of_seed_and_epoch",)),
    Break("data_wait (the loop's clock)", "flowers/engine.py", "enumerate(wait.batches(loader),", "enumerate(loader,",
          (IMB + "test_data_wait_is_near_0_with_ready_batches_and_near_1_with_a_sleeping_loader",)),
    Break("data_wait (the epoch's row)", "flowers/training.py", '"data_wait": train.data_wait,', "",
          (IMB + "test_data_wait_is_in_the_epoch_line_history_and_summary",)),
]


def run_break(b: Break) -> tuple[bool, str]:
    path = REPO / b.file
    original = path.read_text()
    if original.count(b.old) != 1:
        return False, f"snippet found {original.count(b.old)} times in {b.file}"
    path.write_text(original.replace(b.old, b.new))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *b.tests],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
    finally:
        path.write_text(original)
    caught = proc.returncode != 0
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in proc.stdout.splitlines()
              if line.startswith(("FAILED", "ERROR"))]
    return caught, ", ".join(t.split("::")[-1] for t in failed) or proc.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the breaks whose option contains this text")
    args = parser.parse_args()
    missed = 0
    print("| option | break (file: old -> new) | caught by |\n|---|---|---|")
    for b in BREAKS:
        if args.only not in b.option:
            continue
        caught, detail = run_break(b)
        missed += not caught
        change = f"`{b.file}`: `{' '.join(b.old.split())[:60]}` -> `{' '.join(b.new.split())[:60]}`"
        print(f"| {b.option} | {change} | {detail if caught else 'MISSED: ' + detail} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
