"""DALI graphs: pure functions of DataNodes, one definition for ``cpu`` and ``gpu``.

On ``gpu`` the decoder runs ``mixed`` (nvJPEG / the hardware JPEG engine) and every image op runs on the
GPU; on ``cpu`` (DALI's CPU backend, no GPU needed) the same graph runs with CPU ops. Box and flip
arguments are always CPU DataNodes (DALI's rule for argument inputs).

Crop convention (DESIGN.md): a stored box ``(top, left, height, width)`` in pixels with flip ``f`` becomes
``fn.resize(roi_start=(t, l + f*w), roi_end=(t + h, l + w - f*w), roi_relative=False, antialias=True)``;
swapping the x ends flips the crop. Linear interpolation with antialiasing matches torchvision's
``resized_crop`` (bilinear, antialias) on PIL images to within 1 grey level away from the 1-px border
(notes/dali-2.4.md §3). EXIF orientation is never applied (the store's ``exif: ignore`` policy).

Decoding on the GPU matches decoding on the CPU: DALI's mixed decoder upsamples chroma its own way unless
``jpeg_fancy_upsampling`` is on, and the labels were made (and the crops tested) with libjpeg-turbo's
"fancy" upsampling, which Pillow and DALI's CPU decoder use; :class:`DecoderOptions` turns it on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.data_node import DataNode

from .photometric import photometric

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATION = {
    "bilinear": types.INTERP_LINEAR,
    "bicubic": types.INTERP_CUBIC,
    "lanczos": types.INTERP_LANCZOS3,
    "nearest": types.INTERP_NN,
}
OUTPUT_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "uint8": types.UINT8}


@dataclasses.dataclass(frozen=True)
class DecoderOptions:
    """How the ``mixed`` (GPU) decoder runs; the CPU decoder ignores all of it.

    ``fancy_upsampling``: chroma upsampling as libjpeg-turbo / Pillow / DALI's CPU decoder do it, so a crop
    decoded on the GPU has the pixels the teacher's labels were made from (DALI's default is off).
    ``hw_decoder_load``: share of each batch sent to the hardware JPEG engine (A100/H100/H200); the rest
    goes to the CUDA decoder. DALI's default 0.65; 0 turns the engine off.
    ``device_memory_padding`` / ``host_memory_padding``: bytes nvJPEG adds to each per-thread device and
    pinned host buffer so larger images do not reallocate (DALI's defaults 16 MiB / 8 MiB, per thread and
    per pipeline: lower them when many pipelines or ranks share a GPU).
    ``preallocate_width_hint`` / ``preallocate_height_hint``: image size the hardware decoder preallocates
    for (0: none).
    ``fast_idct``: libjpeg-turbo's fast (less exact) IDCT on the CPU decoder and the mixed decoder's CPU
    fallback; off, as Pillow and the label generator decode.
    """

    fancy_upsampling: bool = True
    hw_decoder_load: float = 0.65
    device_memory_padding: int = 16 << 20
    host_memory_padding: int = 8 << 20
    preallocate_width_hint: int = 0
    preallocate_height_hint: int = 0
    fast_idct: bool = False

    def __post_init__(self):
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be between 0 and 1, got {self.hw_decoder_load}")
        for name in ("device_memory_padding", "host_memory_padding", "preallocate_width_hint",
                     "preallocate_height_hint"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def args(self, device: str) -> dict:
        """The decoder operator's arguments for ``device`` (on "cpu" only ``fast_idct`` applies)."""
        idct = {"use_fast_idct": True} if self.fast_idct else {}
        if device != "gpu":
            return idct
        return dict(jpeg_fancy_upsampling=self.fancy_upsampling, hw_decoder_load=float(self.hw_decoder_load),
                    device_memory_padding=int(self.device_memory_padding),
                    host_memory_padding=int(self.host_memory_padding),
                    preallocate_width_hint=int(self.preallocate_width_hint),
                    preallocate_height_hint=int(self.preallocate_height_hint), **idct)


DEFAULT_DECODER = DecoderOptions()


def devices(device: str) -> tuple[str, str]:
    """(decoder device, op device) for "cpu" or "gpu"."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    return ("mixed", "gpu") if device == "gpu" else ("cpu", "cpu")


def interpolation(name: str) -> types.DALIInterpType:
    try:
        return INTERPOLATION[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; use one of {', '.join(INTERPOLATION)}") from None


def read_encoded(source, paths: DataNode) -> DataNode:
    """The encoded images of a source's "paths" output: DALI reads the files it names, or, for a source that
    serves the bytes themselves (a shard set, ``source.serves_bytes``), they are the output."""
    return paths if getattr(source, "serves_bytes", False) else fn.io.file.read(paths)


def decode(encoded: DataNode, device: str, decoder: DecoderOptions = DEFAULT_DECODER) -> DataNode:
    """Decode JPEG/PNG/... bytes to HWC uint8 RGB, EXIF orientation not applied; on the GPU with the CPU
    decoder's chroma upsampling (:class:`DecoderOptions`)."""
    dec, _ = devices(device)
    return fn.decoders.image(encoded, device=dec, output_type=types.RGB, adjust_orientation=False,
                             **decoder.args(device))


def replay_crops(images: DataNode, roi_start: DataNode, roi_end: DataNode, num_crops: int, size: int,
                 device: str, interp: str = "bilinear") -> DataNode:
    """The stored crops of each decoded image: ``(num_crops, size, size, 3)`` uint8, layout FHWC.

    ``roi_start``/``roi_end``: per sample ``(num_crops, 2)`` float (y, x) pixel coordinates with the flip
    already encoded (see :func:`pipelines.fkd_reader.roi_from_boxes`). The image is decoded once; each crop is
    one ROI resize of it.
    """
    return _frames(_crops(images, roi_start, roi_end, num_crops, size, device, interp))


def _crops(images: DataNode, roi_start: DataNode, roi_end: DataNode, num_crops: int, size: int, device: str,
           interp: str) -> list[DataNode]:
    _, dev = devices(device)
    return [fn.resize(images, device=dev, roi_start=roi_start[k], roi_end=roi_end[k], roi_relative=False,
                      size=(size, size), interp_type=interpolation(interp), antialias=True)
            for k in range(num_crops)]


def _frames(crops: list[DataNode]) -> DataNode:
    if len(crops) == 1:
        return fn.expand_dims(crops[0], axes=0, new_axis_names="F")
    return fn.stack(*crops, axis_name="F")


VIEW_PARAMS = ("jitter_factors", "jitter_order", "grayscale", "blur_sigma")  # a reader's per-crop view outputs


def ssl_crops(images: DataNode, roi_start: DataNode, roi_end: DataNode, views: dict[str, DataNode], num_crops: int,
              size: int, device: str, interp: str = "bilinear") -> DataNode:
    """Self-supervised views, the one graph generation (the teacher's views) and training (the student's) apply:
    per crop the stored box and flip (:func:`replay_crops`), then colour jitter in the stored order with the
    stored factors, grayscale and Gaussian blur (:func:`pipelines.photometric.photometric`). ``views``: per
    sample ``jitter_factors`` (n, 4), ``jitter_order`` (n, 4), ``grayscale`` (n,), ``blur_sigma`` (n,), CPU
    DataNodes. MoCo flips last; here the flip is part of the crop: the jitter and grayscale act per pixel and
    the blur's kernel and borders (reflect-101) are symmetric, so flipping first gives the same pixels.
    Returns ``(num_crops, size, size, 3)`` uint8, layout FHWC."""
    crops = _crops(images, roi_start, roi_end, num_crops, size, device, interp)
    _, dev = devices(device)
    f, o, g, s = (views[k] for k in VIEW_PARAMS)
    return _frames([photometric(c, f[k], o[k], g[k], s[k], dev) for k, c in enumerate(crops)])


def view_frames(source, nodes: dict, images: DataNode, roi_start: DataNode, roi_end: DataNode, num_crops: int,
                size: int, device: str, interp: str) -> DataNode:
    """The crops of a reader's nodes at the ROIs ``roi_start``/``roi_end`` (those :func:`fit_rois` let through:
    both kinds of crops go through the one header check): self-supervised views when the reader serves view
    parameters (``source.view_params``), else the stored crops alone."""
    if getattr(source, "view_params", ()):
        return ssl_crops(images, roi_start, roi_end, {k: nodes[k] for k in VIEW_PARAMS}, num_crops, size, device,
                         interp)
    return replay_crops(images, roi_start, roi_end, num_crops, size, device, interp)


def fit_rois(encoded: DataNode, sizes: DataNode, roi_start: DataNode,
             roi_end: DataNode) -> tuple[DataNode, DataNode, DataNode]:
    """Stored crops only on the image they were stored for: per sample, the (height, width) in the header of
    ``encoded`` (the bytes the decoder reads; a header parse, not a decode, on every device) is compared with
    the stored size ``sizes`` (int32 ``(2,)``) that the boxes were checked against. Where they agree the ROIs
    pass unchanged; where not (an image replaced after the labels were made, a crafted store), each crop
    becomes the whole image, so that no box outside its image reaches ``fn.resize`` (DALI would read out of
    bounds and crash the process), and ``fits`` (bool, per sample, on the CPU) says so: the caller refuses
    the batch naming the file. Returns ``(roi_start, roi_end, fits)``."""
    hw = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.INT32)[0:2]
    fits = (hw[0] == sizes[0]) & (hw[1] == sizes[1])
    keep = fn.cast(fits, dtype=types.FLOAT)
    whole = fn.cast(hw, dtype=types.FLOAT)
    return roi_start * keep, roi_end * keep + whole * (1 - keep), fits


def roi_of(boxes: DataNode, flips: DataNode) -> tuple[DataNode, DataNode]:
    """In-graph ROI of per-sample boxes ``(n, 4)`` (top, left, height, width; pixels, float) and flips
    ``(n,)`` (0/1, float): the flip swaps the x ends. CPU DataNodes in, CPU DataNodes ``(n, 2)`` out."""
    t, l, h, w = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    start = fn.stack(t, l + flips * w, axis=1)
    end = fn.stack(t + h, l + w - flips * w, axis=1)
    return start, end


def fkd_crops(images: DataNode, boxes: DataNode, flips: DataNode, num_crops: int, size: int, device: str,
              interp: str = "bilinear") -> DataNode:
    """Drop-in block for an existing DALI pipeline: the ``num_crops`` crops of each decoded image given
    its stored boxes and flips as DataNodes; ``(num_crops, size, size, 3)`` uint8, layout FHWC."""
    start, end = roi_of(boxes, flips)
    return replay_crops(images, start, end, num_crops, size, device, interp)


def to_model_input(frames: DataNode, device: str, *, normalize: bool = True, dtype: str = "float32",
                   channels_last: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, mirror: DataNode | None = None) -> DataNode:
    """Normalise (``(x/255 - mean)/std``) and lay out FHWC frames as FCHW, or FHWC if ``channels_last``;
    ``normalize=False`` keeps uint8 RGB."""
    _, dev = devices(device)
    layout = "FHWC" if channels_last else "FCHW"
    kw = {} if mirror is None else {"mirror": mirror}
    if not normalize:
        return fn.crop_mirror_normalize(frames, device=dev, dtype=types.UINT8, output_layout=layout, **kw)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"normalised output dtype must be float32 or float16 (DALI 2.4 has no bfloat16; "
                         f"the loader casts float32 to bfloat16 on the device), got {dtype!r}")
    return fn.crop_mirror_normalize(frames, device=dev, dtype=OUTPUT_DTYPES[dtype], output_layout=layout,
                                    mean=[m * 255 for m in mean], std=[s * 255 for s in std], **kw)


def as_frames(image: DataNode) -> DataNode:
    """HWC image -> (1, H, W, C) FHWC, so single-crop graphs share :func:`to_model_input`."""
    return fn.expand_dims(image, axes=0, new_axis_names="F")


def _round_half_even_half(d: DataNode) -> DataNode:
    """Python's ``round(d / 2)`` for integer DataNodes (torchvision's centre-crop offset)."""
    k = d // 2
    return k + (d - 2 * k) * (k - 2 * (k // 2))


def center_crop(images: DataNode, size: int, resize_size: int, device: str,
                interp: str = "bilinear") -> DataNode:
    """Validation view exactly as torchvision's ``Resize(resize_size)`` + ``CenterCrop(size)``: shorter
    side to ``resize_size``, longer side ``int(resize_size * long / short)``, crop offset
    ``round((new - size) / 2)``; computed per image inside the graph."""
    _, dev = devices(device)
    shape = images.shape(dtype=types.INT32)
    H, W = shape[0], shape[1]
    h_short = fn.cast(H <= W, dtype=types.INT32)
    new_long = (resize_size * dmath.max(H, W)) // dmath.min(H, W)
    new_h = h_short * resize_size + (1 - h_short) * new_long
    new_w = (1 - h_short) * resize_size + h_short * new_long
    resized = fn.resize(images, device=dev, resize_x=fn.cast(new_w, dtype=types.FLOAT),
                        resize_y=fn.cast(new_h, dtype=types.FLOAT), interp_type=interpolation(interp),
                        antialias=True)
    dy, dx = new_h - size, new_w - size
    pos_y = fn.cast(_round_half_even_half(dy), dtype=types.FLOAT) / fn.cast(dmath.max(dy, 1), dtype=types.FLOAT)
    pos_x = fn.cast(_round_half_even_half(dx), dtype=types.FLOAT) / fn.cast(dmath.max(dx, 1), dtype=types.FLOAT)
    return fn.crop(resized, device=dev, crop=(size, size), crop_pos_x=pos_x, crop_pos_y=pos_y)


def random_resized_crop(encoded: DataNode, size: int, device: str, *, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), antialias: bool = True,
                        interp: str = "bilinear", seed: int = -1,
                        decoder: DecoderOptions = DEFAULT_DECODER) -> DataNode:
    """The standard DALI ImageNet augmentation: fused decode + random crop (ROI decoding), resize."""
    dec, dev = devices(device)
    img = fn.decoders.image_random_crop(encoded, device=dec, output_type=types.RGB, adjust_orientation=False,
                                        random_area=list(scale), random_aspect_ratio=list(ratio),
                                        num_attempts=10, seed=seed, **decoder.args(device))
    return fn.resize(img, device=dev, size=(size, size), interp_type=interpolation(interp), antialias=antialias)


# ---------------------------------------------------------------------------------------------- pipelines
@pipeline_def(enable_conditionals=True)  # an embedding store's views branch per sample (pipelines.photometric)
def fkd_pipeline(source, *, num_crops: int, size: int, device: str, normalize: bool = True,
                 dtype: str = "float32", channels_last: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, interp: str = "bilinear", labels_on_device: bool = True,
                 decoder: DecoderOptions = DEFAULT_DECODER):
    """FKD replay: outputs images (B, n, 3, S, S) [or (B, n, S, S, 3)], the store kind's labels (top-k: topk_idx,
    topk_val; embedding: embedding), target, index, crop_ids, all aligned per sample, and last ``fits`` (B,) on the
    CPU: False for an image whose header is not its stored size (:func:`fit_rois`; the loader refuses such a
    batch). ``source`` is a :class:`pipelines.fkd_reader.FKDReader`; an embedding store's views are replayed with
    their photometric ops, at the ROIs :func:`fit_rois` let through as the stored crops are."""
    nodes = source.nodes()
    encoded = read_encoded(source, nodes["paths"])
    roi_start, roi_end, fits = fit_rois(encoded, nodes["sizes"], nodes["roi_start"], nodes["roi_end"])
    images = decode(encoded, device, decoder)
    frames = view_frames(source, nodes, images, roi_start, roi_end, num_crops, size, device, interp)
    out = to_model_input(frames, device, normalize=normalize, dtype=dtype, channels_last=channels_last,
                         mean=mean, std=std)
    labels = [nodes[k] for k in (*source.label_names, "target", "index", "crop_ids")]
    if device == "gpu" and labels_on_device:
        labels = [x.gpu() for x in labels]
    return (out, *labels, fits)


@pipeline_def(enable_conditionals=False)
def eval_pipeline(source, *, size: int, resize_size: int, device: str, normalize: bool = True,
                  dtype: str = "float32", channels_last: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD, interp: str = "bilinear",
                  decoder: DecoderOptions = DEFAULT_DECODER):
    """Validation: resize shorter side + centre crop; outputs images (B, 1, 3, S, S), target, index."""
    nodes = source.nodes()
    images = decode(read_encoded(source, nodes["paths"]), device, decoder)
    view = as_frames(center_crop(images, size, resize_size, device, interp))
    out = to_model_input(view, device, normalize=normalize, dtype=dtype, channels_last=channels_last,
                         mean=mean, std=std)
    labels = [nodes["target"], nodes["index"]]
    if device == "gpu":
        labels = [x.gpu() for x in labels]
    return (out, *labels)


@pipeline_def(enable_conditionals=False)
def standard_pipeline(source, *, size: int, device: str, normalize: bool = True, dtype: str = "float32",
                      channels_last: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD, scale: Sequence[float] = (0.08, 1.0),
                      ratio: Sequence[float] = (3 / 4, 4 / 3), antialias: bool = True, interp: str = "bilinear",
                      decoder: DecoderOptions = DEFAULT_DECODER):
    """The usual DALI ImageNet training pipeline (one random crop per decode, flip p=0.5, hard labels)."""
    nodes = source.nodes()
    crop = random_resized_crop(read_encoded(source, nodes["paths"]), size, device, scale=scale, ratio=ratio,
                               antialias=antialias, interp=interp, decoder=decoder)
    out = to_model_input(as_frames(crop), device, normalize=normalize, dtype=dtype,
                         channels_last=channels_last, mean=mean, std=std,
                         mirror=fn.random.coin_flip(probability=0.5))
    labels = [nodes["target"], nodes["index"]]
    if device == "gpu":
        labels = [x.gpu() for x in labels]
    return (out, *labels)


@pipeline_def(enable_conditionals=True)  # as fkd_pipeline: the same views
def generation_pipeline(source, *, num_crops: int, views: Sequence[tuple], device: str, dtype: str = "float32",
                        channels_last: bool = False, normalize: bool = True,
                        decoder: DecoderOptions = DEFAULT_DECODER):
    """Teacher inputs. Per sample: one decode, one group of ``num_crops`` stored crops for each view
    ``(size, interpolation, mean, std)`` (one per distinct teacher view); outputs the crops of every view,
    then index, crop ids and the decoded image's shape. ``normalize=False`` gives uint8 RGB crops. A reader
    serving view parameters gets self-supervised views (:func:`ssl_crops`, the graph training replays). A sample
    whose image is not the size its boxes were made for is cut as a whole, stored crops and views alike
    (:func:`fit_rois`): the caller compares the shape with the size and refuses it."""
    nodes = source.nodes(("paths", "roi_start", "roi_end", "sizes", "index", "crop_ids", *source.view_params))
    encoded = read_encoded(source, nodes["paths"])
    roi_start, roi_end, _fits = fit_rois(encoded, nodes["sizes"], nodes["roi_start"], nodes["roi_end"])
    images = decode(encoded, device, decoder)
    outs = []
    for size, interp, mean, std in views:
        frames = view_frames(source, nodes, images, roi_start, roi_end, num_crops, size, device, interp)
        outs.append(to_model_input(frames, device, normalize=normalize, dtype=dtype, channels_last=channels_last,
                                   mean=mean, std=std))
    return (*outs, nodes["index"], nodes["crop_ids"], images.shape())


@pipeline_def(enable_conditionals=False)
def decode_pipeline(source, *, device: str, decoder: DecoderOptions = DEFAULT_DECODER, images_out: bool = False):
    """The decoder alone (the ceiling for decode-once designs); outputs each image's shape and index, and
    with ``images_out`` the decoded images themselves (decode-parity checks)."""
    nodes = source.nodes(("paths", "index"))
    images = decode(read_encoded(source, nodes["paths"]), device, decoder)
    if images_out:
        return images.shape(), nodes["index"], images
    return images.shape(), nodes["index"]
