"""The Trainer subclass: surgery's LR schedule (surgery.train.schedule), its data order, the final
save in the input's dtype, and checkpoints marked complete before old ones are rotated."""

from __future__ import annotations

from pathlib import Path

from surgery.train.checkpoints import mark_checkpoint_complete, prune_checkpoints
from surgery.train.schedule import Schedule


def trainer_class():
    import transformers

    class SurgeryTrainer(transformers.Trainer):
        """Trainer whose schedule can start part-way along a longer one (grow with `schedule: continue`),
        reading the training set in surgery's order."""

        def __init__(self, *args, schedule=None, mixture=None, eval_domains=None, **kwargs):
            """HF Trainer's arguments, and surgery's: `schedule` (surgery.train.schedule.Schedule),
            the data mixture's record and its held-out domains' weights (for train.json)."""
            super().__init__(*args, **kwargs)
            self.schedule = schedule or Schedule()
            self.mixture, self.eval_domains = mixture, eval_domains

        def create_scheduler(self, num_training_steps, optimizer=None):
            import torch

            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.schedule.factor)
                self._created_lr_scheduler = True
            return self.lr_scheduler

        save_dtype = None  # set for the final save only: the weights in the input checkpoint's dtype

        def _get_train_sampler(self, train_dataset=None):
            """In order: the training set is already the run's shuffled order from this stage's start
            (surgery.train.data.Ordered / Mixture), so growth continues it rather than replaying it."""
            import torch

            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def _save(self, output_dir=None, state_dict=None):
            import torch

            if self.save_dtype is not None:
                if state_dict is None:
                    state_dict = self.model.state_dict()
                cast: dict = {}  # tied weights stay one tensor
                state_dict = {
                    k: cast.setdefault((v.data_ptr(), tuple(v.shape)), v.to(self.save_dtype)) if torch.is_floating_point(v) else v
                    for k, v in state_dict.items()
                }
            super()._save(output_dir, state_dict=state_dict)

        def _save_checkpoint(self, model, trial):
            """Save, then mark the checkpoint complete (fsynced), then rotate old ones: a kill during a
            save leaves an unmarked folder that --resume skips, and never the only complete one deleted."""
            limit = self.args.save_total_limit
            self.args.save_total_limit = None  # rotation happens below, after the marker
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            if self.args.should_save:
                folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                mark_checkpoint_complete(folder)
                prune_checkpoints(folder.parent, limit)

    return SurgeryTrainer
