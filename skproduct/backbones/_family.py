"""What a backbone family is: :class:`BackboneSpec`, the :class:`BackboneFamily` base class, and the registry.

A family (timm, open_clip, ...) is one object that knows how to read its part
of a backbone string, the preprocessing its networks expect, how to build a
feature extractor, and how to name the weights it will hold. The registry
``FAMILIES`` maps each string prefix (``"timm"`` in ``"timm:resnet50"``) to its
family; a new family is one subclass and one :func:`register_family` call.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..exceptions import WeightsUnavailableError
from ._weights import file_sha256, load_weights_file

if TYPE_CHECKING:  # pragma: no cover
    from ._preprocessing import Preprocessing

logger = logging.getLogger(__name__)

FAMILIES: dict[str, BackboneFamily] = {}
"""The registered families, keyed by their backbone-string prefix."""


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone string.

    Attributes
    ----------
    family : str
        The prefix of a registered family: ``"timm"`` or ``"open_clip"``
        unless more are registered.
    name : str
        The model name in that library (timm names may carry a ``.tag``).
    tag : str or None
        A pretrained tag after ``/`` (open_clip's ``"laion2b_s34b_b79k"``);
        ``None`` for timm.

    Examples
    --------
    >>> spec = BackboneSpec("open_clip", "ViT-B-32", "openai")
    >>> str(spec)
    'open_clip:ViT-B-32/openai'
    """

    family: str
    name: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.family}:{self.name}" + (f"/{self.tag}" if self.tag else "")


class BackboneFamily:
    """One library of backbones, seen through the four things skproduct asks of it.

    A subclass sets :attr:`prefix`, :attr:`syntax` and :attr:`distribution`
    and implements :meth:`preprocessing`, :meth:`create` and
    :meth:`pretrained_name`; :meth:`validate` and :meth:`parse` have
    defaults. :meth:`build` and :meth:`weights_identity` are templates that
    rarely need overriding. Instances are registered with
    :func:`register_family`.

    Attributes
    ----------
    prefix : str
        The text before ``:`` in a backbone string.
    syntax : str
        How a backbone string of this family reads, for error messages.
    distribution : str
        The installed distribution whose version enters the weights identity
        (an upgrade may change the forward pass or the random init).
    takes_tag : bool
        Whether names may carry a ``/<tag>``.
    weights_prefix : str or None
        Key prefix to strip from a local weights file when it has keys under it
        (``"visual."`` for a whole CLIP checkpoint loaded into its image tower).

    Examples
    --------
    >>> import torch
    >>> from skproduct.backbones import Preprocessing
    >>> class Tiny(BackboneFamily):
    ...     prefix, syntax, distribution = "tiny", "tiny:<width>", "torch"
    ...     def preprocessing(self, spec, image_size=None):
    ...         return Preprocessing(image_size or 16, image_size or 16, "bilinear", (0.5,) * 3, (0.5,) * 3)
    ...     def create(self, spec, *, pretrained, image_size):
    ...         return torch.nn.Sequential(torch.nn.Conv2d(3, int(spec.name), 3), torch.nn.AdaptiveAvgPool2d(1),
    ...                                    torch.nn.Flatten())
    ...     def pretrained_name(self, spec):
    ...         raise ValueError("tiny networks have no pretrained weights")
    >>> Tiny().parse("tiny:8")
    BackboneSpec(family='tiny', name='8', tag=None)
    >>> Tiny().build(Tiny().parse("tiny:8"), pretrained=False, weights=None, image_size=None)(
    ...     torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 8])
    """

    prefix: ClassVar[str]
    syntax: ClassVar[str]
    distribution: ClassVar[str]
    takes_tag: ClassVar[bool] = False
    weights_prefix: ClassVar[str | None] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.prefix!r})"

    # -- names ---------------------------------------------------------------
    def parse(self, backbone: str) -> BackboneSpec:
        """Read ``"<prefix>:<name>[/<tag>]"`` into a :class:`BackboneSpec` (syntax only, nothing imported)."""
        _, _, rest = backbone.partition(":")
        name, _, tag = rest.partition("/")
        if not name or (tag and not self.takes_tag):
            raise ValueError(f"cannot read the model name in {backbone!r}")
        return BackboneSpec(self.prefix, name, tag or None)

    def validate(self, spec: BackboneSpec) -> None:
        """Raise ``ValueError`` naming the fix when the library has no such model; the default accepts all."""

    # -- numbers -------------------------------------------------------------
    def preprocessing(self, spec: BackboneSpec, image_size: int | None = None) -> Preprocessing:
        """The eval preprocessing the network expects, at ``image_size`` (square) if given."""
        raise NotImplementedError

    def create(self, spec: BackboneSpec, *, pretrained: bool, image_size: int | None) -> Any:
        """The feature extractor module, ``(N, 3, H, W) -> (N, D)``, pretrained or with random weights.

        Called under a seeded torch random state. A failed download of
        pretrained weights should raise :meth:`offline_error`.
        """
        raise NotImplementedError

    def build(self, spec: BackboneSpec, *, pretrained: bool, weights: str | None, image_size: int | None) -> Any:
        """:meth:`create` the module, then load the local ``weights`` file into it when given.

        A local file wins over ``pretrained``: nothing is downloaded then.
        """
        module = self.create(spec, pretrained=pretrained and weights is None, image_size=image_size)
        if weights is not None:
            load_weights_file(module, weights, str(spec), prefix=self.weights_prefix)
        return module

    # -- weights -------------------------------------------------------------
    def pretrained_name(self, spec: BackboneSpec) -> str:
        """The name of the published weights ``spec`` downloads (``"resnet50.a1_in1k"``)."""
        raise NotImplementedError

    def library_versions(self) -> str:
        """``"torch-<version>+<prefix>-<version>"``: the code that turns weights into numbers."""
        from importlib.metadata import version

        return f"torch-{version('torch')}+{self.prefix}-{version(self.distribution)}"

    def weights_identity(self, spec: BackboneSpec, pretrained: bool, weights: str | os.PathLike | None,
                         seed: int) -> str:
        """Name the weights the built module will hold: a file's SHA-256, a seed, or the published name."""
        versions = self.library_versions()
        if weights is not None:
            return f"file:{file_sha256(weights)}:{versions}"
        if not pretrained:
            return f"random:{seed}:{versions}"
        return f"pretrained:{self.pretrained_name(spec)}:{versions}"

    def offline_error(self, spec: BackboneSpec, exc: Exception) -> WeightsUnavailableError:
        """The error for pretrained weights that could not be fetched, saying how to pass a local file."""
        return WeightsUnavailableError(
            f"pretrained weights for {spec} could not be downloaded (offline?): pass weights='path/to/file' "
            f"with a local copy, or pretrained=False for random weights ({type(exc).__name__}: {exc})"
        )


def register_family(family: BackboneFamily, *, replace: bool = False) -> BackboneFamily:
    """Register ``family`` under its prefix so backbone strings ``"<prefix>:..."`` reach it.

    Parameters
    ----------
    family : BackboneFamily
        An instance (not the class).
    replace : bool, default=False
        Allow replacing a family already registered under the same prefix.

    Returns
    -------
    BackboneFamily
        ``family``, for chaining.

    Examples
    --------
    >>> from skproduct.backbones import FAMILIES, TimmFamily
    >>> class TimmAlias(TimmFamily):
    ...     prefix = "timm_alias"
    >>> _ = register_family(TimmAlias())
    >>> "timm_alias" in FAMILIES
    True
    >>> unregister_family("timm_alias")
    TimmAlias(prefix='timm_alias')
    """
    if isinstance(family, type):
        raise TypeError(f"register_family takes a family instance: pass {family.__name__}(), not the class")
    if not isinstance(family, BackboneFamily):
        raise TypeError(f"a backbone family must subclass BackboneFamily, got {type(family).__name__}")
    prefix = getattr(family, "prefix", None)
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in ":/ "):
        raise ValueError(f"{type(family).__name__}.prefix must be a non-empty string without ':', '/' or spaces, "
                         f"got {prefix!r}")
    if prefix in FAMILIES and not replace and FAMILIES[prefix] is not family:
        raise ValueError(f"a backbone family is already registered as {prefix!r} ({FAMILIES[prefix]!r}); "
                         "pass replace=True to replace it")
    FAMILIES[prefix] = family
    logger.debug("registered backbone family %r", family)
    return family


def unregister_family(prefix: str) -> BackboneFamily:
    """Remove the family registered as ``prefix`` and return it (see :func:`register_family`)."""
    try:
        return FAMILIES.pop(prefix)
    except KeyError:
        raise KeyError(f"no backbone family is registered as {prefix!r}; registered: {tuple(FAMILIES)}") from None


def family_of(spec: BackboneSpec | str) -> BackboneFamily:
    """The registered family of a spec, or of a prefix such as ``"timm"``.

    Examples
    --------
    >>> from skproduct.backbones import parse_backbone
    >>> family_of(parse_backbone("timm:resnet18"))
    TimmFamily(prefix='timm')
    >>> family_of("open_clip").takes_tag
    True
    """
    prefix = spec.family if isinstance(spec, BackboneSpec) else spec
    try:
        return FAMILIES[prefix]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backbone family {prefix!r}; use one of {tuple(FAMILIES)}") from None
