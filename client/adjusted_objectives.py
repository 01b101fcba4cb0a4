"""Backdoor adjustment over a confounder dictionary, and FedBN.

Backdoor adjustment (Pearl): if z blocks every back-door path from image to label,

    P(Y | do(X)) = sum_z P(Y | X, z) P(z).

Each hospital fits P(Y | X, z) on its own cases, so whatever the confounder explains of
the label (a tag that tracks the diagnosis at this hospital) is absorbed by z's dictionary
entry rather than read off the image; prediction then averages z out (client.models).
Two dictionaries: the strata a hospital records per case (scanner protocol, denoising,
burned-in marker, patient sex), or acquisition-style prototypes learned without any
metadata (MCDRL's cross-attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from client.federated_objectives import VREx
from client.models import recalibrate_batch_norm
from client.objectives import ERM, Objective


class _StrataAdjusted(Objective):
    """Trains P(Y | X, z) with each case's recorded stratum z."""

    architecture = "strata-adjusted"
    needs_strata = True

    def logits(self, model, images, strata):
        if strata is None:
            raise ValueError(
                f"objective {self.name!r} needs each case's recorded acquisition stratum; none was given"
            )
        return model.conditional(images, strata)

    def prepare(self, model, images, labels, strata):
        # This hospital's P(z) and P(Y | z); FedAvg's example-weighted mean of P(z) makes
        # it the federation's.
        model.fit_strata(strata, labels)

    def local_state_keys(self, model):
        # How strongly a stratum tracks the label is the hospital's own (a tag may mean
        # "positive" here and little elsewhere): each keeps its own P(Y | z).
        return {"stratum_logit"}


class BackdoorStrata(_StrataAdjusted, ERM):
    """Backdoor adjustment over known strata: risk of P(Y | X, z) at each case's own z."""

    name = "backdoor-strata"


class BackdoorStrataVREx(_StrataAdjusted, VREx):
    """Backdoor adjustment over known strata, with V-REx's equalised risks on P(Y | X, z)."""

    name = "backdoor-strata-vrex"


class _StyleAdjusted(Objective):
    """Trains P(Y | X, z(X)), z the cross-attended style prototype of the image itself.

    The style branch first says what style alone tells about the label (its own risk);
    the image features are trained on top of that, detached, so they learn what style
    does not explain. Without the split the two are interchangeable and the features
    take the shortcut as readily as the prototypes do.
    """

    architecture = "style-adjusted"

    def logits(self, model, images, strata):
        return model.conditional(images, model.style_logit(images).detach())

    def loss(self, model, images, labels, strata=None):
        total, stats = super().loss(model, images, labels, strata)
        style_risk = F.binary_cross_entropy_with_logits(model.style_logit(images), labels)
        return total + style_risk, stats | {"style-risk": style_risk.item()}

    def prepare(self, model, images, labels, strata):
        # P(z): the mean attention this hospital's images give each prototype.
        with torch.no_grad():
            model.set_prior(model.attention(images).mean(dim=0))


class BackdoorStyle(_StyleAdjusted, ERM):
    """Backdoor adjustment over learned acquisition-style prototypes (after MCDRL)."""

    name = "backdoor-style"


class FedBN(ERM):
    """FedBN (Li et al. 2021): each hospital keeps its batch-norm layers, the rest is shared.

    Running statistics are recomputed from the hospital's own images whenever the model
    arrives: after averaging, the convolutions differ from those the old statistics were
    taken with. A hospital that never trained (a new one) does the same with its unlabeled
    images (AdaBN), the normalisation's weights and shifts being the federation's average.
    """

    name = "fedbn"
    architecture = "batchnorm"
    per_example_loss = False  # batch normalisation couples the cases of a batch

    def local_state_keys(self, model):
        return {
            f"{module_name}.{key}"
            for module_name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for key in module.state_dict()
        }

    def localise(self, model, images):
        recalibrate_batch_norm(model, images)
