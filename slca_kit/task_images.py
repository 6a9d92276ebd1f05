"""How the trainer and the methods read a run's images and features on one process: test-transform batches and
features of any classes (this process's shard, or the whole split on every process), a method's own training epochs,
and a task's cached features (``train.feature_cache``)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import feature_cache
from .config import Config
from .data.device_augment import AugmentedLoader, BatchAugment, DecodedTaskDataset, decode_all
from .data.task_data import EpochShuffleSampler, TaskDataset
from .preemption import ignore_stop_signals


class TaskImages:
    def __init__(self, config: Config, data, label_map: np.ndarray, transforms: tuple[Callable, Callable],
                 accelerator, model: Callable[[], nn.Module], run_dir: Path):
        self.config, self.data, self.label_map = config, data, label_map
        self.train_transform, self.test_transform = transforms
        self.accelerator = accelerator
        self.model = model  # the trainer's current model (it is replaced after each task's unwrap)
        self.run_dir = run_dir
        # data.augment_on_device: the transform's batched form and the decoded training split, made here so that
        # an unsupported transform or images of mixed sizes are refused before any training
        self._batch_augment = self._decoded_train = None
        if config.data.augment_on_device:
            self._batch_augment = BatchAugment(self.train_transform)
            self._decoded_train = decode_all(data.train)

    def training_dataset(self, classes: list[int], augment_seed: int, extra_indices: list[int]) -> TaskDataset:
        """A task's training images with the train transform: per image in the loader, or with
        ``data.augment_on_device`` decoded once and left for ``training_loader`` to augment on the device."""
        if not self.config.data.augment_on_device:
            return TaskDataset(self.data.train, self.label_map, classes, self.train_transform,
                               augment_seed=augment_seed, extra_indices=extra_indices)
        return DecodedTaskDataset(self._decoded_train, self._batch_augment, self.data.train, self.label_map, classes,
                                  self.train_transform, augment_seed=augment_seed, extra_indices=extra_indices)

    def training_loader(self, prepared_loader):
        """The prepared loader, finishing each batch on the device with ``data.augment_on_device``."""
        if not self.config.data.augment_on_device:
            return prepared_loader
        return AugmentedLoader(prepared_loader, self._batch_augment)

    def shard(self, dataset) -> Subset:
        """This process's share of ``dataset`` (every num_processes-th sample, no padding, no duplicates)."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return Subset(dataset, range(rank, len(dataset), world))

    def loader(self, dataset, batch_size: int, **kwargs) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.config.data.num_workers,
                          worker_init_fn=ignore_stop_signals, **kwargs)

    def iterate_images(self, classes: list[int], split: str, batch_size: int):
        """Batches of (images, labels) on the device: this process's shard of ``split`` for ``classes``, TEST
        transform, fixed order."""
        source = self.data.train if split == "train" else self.data.test
        dataset = TaskDataset(source, self.label_map, classes, self.test_transform)
        for images, labels in self.loader(self.shard(dataset), batch_size):
            yield images.to(self.accelerator.device), labels.to(self.accelerator.device)

    def iterate_training_images(self, classes: list[int], batch_size: int, epoch: int, task: int):
        """One epoch of the training split's images of ``classes``, TRAIN transform, in an order and augmentation
        drawn from (seed, task, epoch) apart from the main loop's: each global batch of ``batch_size`` is shared out
        (every num_processes-th image), so a process's share may be empty; (images, labels) on the device."""
        seed = self.config.train.seed * 1_000 + task
        dataset = TaskDataset(self.data.train, self.label_map, classes, self.train_transform, augment_seed=seed)
        dataset.set_epoch(100_000 + epoch)  # epochs numbered after any main loop's
        sampler = EpochShuffleSampler(len(dataset), seed)
        sampler.set_epoch(100_000 + epoch)
        order = list(sampler)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shares = [order[start:start + batch_size][rank::world] for start in range(0, len(order), batch_size)]
        loaded = iter(self.loader(dataset, 1, batch_sampler=[share for share in shares if share]))
        device = self.accelerator.device
        size = self.config.data.image_size
        for share in shares:
            if share:
                images, labels = next(loaded)
                yield images.to(device), labels.to(device)
            else:
                yield torch.zeros(0, 3, size, size, device=device), torch.zeros(0, dtype=torch.long, device=device)

    @torch.no_grad()
    def _shard_features(self, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (float32, full precision) and labels of this process's shard of ``dataset`` with the model as it
        is now, and each sample's position in ``dataset``."""
        shard = self.shard(dataset)
        device = self.accelerator.device
        model = self.model()
        model.eval()
        features, labels = [], []
        for images, targets in self.loader(shard, self.config.train.eval_batch_size):
            features.append(model.features(images.to(device)).float())
            labels.append(targets.to(device))
        positions = torch.as_tensor(list(shard.indices), dtype=torch.long, device=device)
        if not features:
            dim = model.backbone.num_features
            return torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device), positions
        return torch.cat(features), torch.cat(labels), positions

    def _gathered(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``tensors`` concatenated in process order, on every process (shards differ in length),
        sorted by the last one."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([tuple(t.cpu() for t in tensors)])
            tensors = tuple(torch.cat([part[k] for part in parts]).to(self.accelerator.device)
                            for k in range(len(tensors)))
        order = torch.argsort(tensors[-1])
        return [t[order] for t in tensors]

    def _extract(self, classes: list[int], split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's shard of ``split`` for ``classes``: features with the TEST transform and the backbone as it
        is now (slca.md, Class statistics), labels, and split indices."""
        source = self.data.train if split == "train" else self.data.test
        dataset = TaskDataset(source, self.label_map, classes, self.test_transform)
        features, labels, positions = self._shard_features(dataset)
        indices = torch.as_tensor(dataset.indices, dtype=torch.long, device=positions.device)[positions]
        return features, labels, indices

    def extract_features(self, classes: list[int], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's shard: features and labels (see ``_extract``)."""
        features, labels, _ = self._extract(classes, split)
        return features, labels

    def gather_features(self, classes: list[int], split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, labels and split indices of ALL of ``split``'s samples of ``classes`` on every process,
        ordered by split index, so that every process (and any number of processes) sees the same tensors."""
        features, labels, indices = self._gathered(*self._extract(classes, split))
        return features, labels, indices

    def cached_features(self, task: int, images: TaskDataset, timer) -> feature_cache.FeatureViews:
        """The task's training features, read from the run folder or computed once (slca_kit/feature_cache.py)."""
        views = self.config.train.feature_cache_views
        path = feature_cache.cache_file(self.run_dir, task)
        cached = feature_cache.load_views(path, images.indices, views)
        if cached is None:
            with timer("feature cache"):
                passes = []
                for view in range(max(views, 1)):
                    source = copy.copy(images)
                    source.transform = self.train_transform if views else self.test_transform
                    source.set_epoch(view)
                    features, _, _ = self._gathered(*self._shard_features(source))  # in the dataset's order
                    passes.append(features.cpu())
                cached = torch.stack(passes).cpu(), torch.as_tensor(images.labels, dtype=torch.long)
            if self.accelerator.is_main_process:
                feature_cache.save_views(path, *cached, images.indices)
            self.accelerator.wait_for_everyone()
        return feature_cache.FeatureViews(*cached)
