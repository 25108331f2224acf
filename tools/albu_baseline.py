"""The per-image albumentations baseline for the default augmentation policy.

    python -m upright.tools.albu_baseline --size 128 --images 512 --processes 2
    (bench_input runs it side by side with the TensorFlow policy)

albumentations (an optional extra, not a core dependency) applied one image
at a time with the op list closest to upright's default policy (see
pipeline/augment.py DEFAULT_SPEC), run in worker processes the way it is
combined with tf.data today (a multiprocessing pool or a py_function per
image). Images are already decoded uint8 arrays, so this measures the
augmentation alone, like bench_input.benchmark_ops.

Where albumentations has no equivalent op, the closest cheap stand-in is used
and marked below; the stand-ins are at most as costly as the originals, so
the baseline is not handicapped:
  add            -> RandomBrightnessContrast(brightness +-15/255, contrast 0)
  multiply       -> MultiplicativeNoise(0.8..1.2, one value per image)
  hue_saturation -> HueSaturationValue (additive shifts)   [stand-in]
  gaussian/laplace noise -> GaussNoise / AdditiveNoise(laplace), per channel
  poisson noise  -> ShotNoise                              [stand-in]
  dropout / pepper / salt -> PixelDropout / SaltAndPepper
  frequency_blend -> RandomBrightnessContrast(contrast +-0.2), p 0.5 [stand-in]
  gaussian / average / motion / median blur -> GaussianBlur(0.5..1) / Blur(3) /
                    MotionBlur(3..5, any angle) / MedianBlur(3)
  jpeg           -> ImageCompression(60..80), p 0.5
  gamma, per-channel gamma, sigmoid, log, linear contrast -> RandomGamma and
                    cv2.LUT lambdas (how one writes the missing ones)
  rotate         -> Rotate(+-2 degrees, BORDER_REPLICATE), p 0.5
"""
import argparse
import multiprocessing
import os
import time

import numpy as np


def _lut_op(make_lut):
    """An albumentations Lambda applying a per-image random 256-entry LUT."""
    import cv2

    def apply(image, **unused):
        return cv2.LUT(image, make_lut(np.random))
    return apply


def _channel_gamma(image, **unused):
    import cv2
    gammas = np.random.uniform(0.7, 1.3, 3)
    x = np.arange(256) / 255.0
    luts = [np.clip(255 * x ** g, 0, 255).astype(np.uint8) for g in gammas]
    return cv2.merge([cv2.LUT(image[..., i], luts[i]) for i in range(3)])


def _sigmoid_lut(rng):
    gain, cutoff = rng.uniform(5, 8), rng.uniform(0.3, 0.6)
    x = np.arange(256) / 255.0
    return np.clip(255 / (1 + np.exp(gain * (cutoff - x))), 0, 255).astype(np.uint8)


def _log_lut(rng):
    gain = rng.uniform(0.6, 1.0)
    return np.clip(255 * gain * np.log2(1 + np.arange(256) / 255.0), 0, 255).astype(np.uint8)


def _linear_lut(rng):
    a = rng.uniform(0.6, 1.4)
    return np.clip(127.5 + a * (np.arange(256) - 127.5), 0, 255).astype(np.uint8)


def make_pipeline():
    """The albumentations Compose closest to augment.DEFAULT_SPEC."""
    import albumentations as A
    import cv2
    return A.Compose([
        A.ImageCompression(quality_range=(60, 80), p=0.5),
        A.OneOf([
            A.RandomBrightnessContrast(brightness_limit=(-15 / 255, 15 / 255),
                                       contrast_limit=(0, 0), p=1),
            A.MultiplicativeNoise(multiplier=(0.8, 1.2), per_channel=False,
                                  elementwise=False, p=1),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=0, p=1),
        ], p=1),
        A.OneOf([
            A.GaussNoise(std_range=(0.02 / 255, 0.05), per_channel=True, p=1),
            A.AdditiveNoise(noise_type="laplace", spatial_mode="per_pixel",
                            noise_params={"mean_range": (0.0, 0.0), "scale_range": (0.0, 0.05)},
                            p=1),
            A.ShotNoise(scale_range=(0.02, 0.06), p=1),
        ], p=1),
        A.OneOf([
            A.PixelDropout(dropout_prob=0.005, per_channel=False, drop_value=0, p=1),
            A.SaltAndPepper(amount=(0.005, 0.005), salt_vs_pepper=(0.0, 0.0), p=1),
            A.SaltAndPepper(amount=(0.01, 0.01), salt_vs_pepper=(1.0, 1.0), p=1),
        ], p=1),
        A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(-0.2, 0.2), p=0.5),
        A.OneOf([
            A.GaussianBlur(sigma_limit=(0.5, 1.0), p=1),
            A.Blur(blur_limit=(3, 3), p=1),
            A.MotionBlur(blur_limit=(3, 5), allow_shifted=False, p=1),
            A.MedianBlur(blur_limit=(3, 3), p=1),
        ], p=1),
        A.OneOf([
            A.RandomGamma(gamma_limit=(70, 130), p=1),
            A.Lambda(image=_channel_gamma, p=1),
            A.Lambda(image=_lut_op(_sigmoid_lut), p=1),
            A.Lambda(image=_lut_op(_log_lut), p=1),
            A.Lambda(image=_lut_op(_linear_lut), p=1),
        ], p=1),
        A.Rotate(limit=2, border_mode=cv2.BORDER_REPLICATE, p=0.5),
    ])


_PIPELINE = None


def _init_worker():
    global _PIPELINE
    import cv2
    cv2.setNumThreads(1)  # one core per worker process, as in a pool
    np.random.seed(os.getpid() % (2 ** 31))
    _PIPELINE = make_pipeline()


def _augment_chunk(images):
    """Augments a chunk; returns (count, CPU seconds spent in this worker)."""
    start = time.process_time()
    for image in images:
        # rot90 as the input pipeline does before the pixel ops.
        image = np.ascontiguousarray(np.rot90(image, np.random.randint(4)))
        _PIPELINE(image=image)
    return len(images), time.process_time() - start


def images_per_second(images, *, processes=2, rounds=3, chunk=32):
    """Throughput of the baseline on uint8 [N, S, S, 3] images, in images/s.

    Runs `rounds` passes over the images in a pool of `processes` workers
    (each with OpenCV single-threaded); the pool is warmed up first.
    Returns (images/s, CPU ms per image measured inside the workers; it does
    not depend on other load on the machine, the wall rate does).
    """
    images = np.asarray(images, np.uint8)
    chunks = [images[i:i + chunk] for i in range(0, len(images), chunk)]
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_init_worker) as pool:
        pool.map(_augment_chunk, chunks[:processes])  # warm up every worker
        start = time.perf_counter()
        results = [r for _ in range(rounds) for r in pool.map(_augment_chunk, chunks)]
        wall = time.perf_counter() - start
    done = sum(n for n, _ in results)
    cpu = sum(c for _, c in results)
    return done / wall, 1000.0 * cpu / done


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, [args.images, args.size, args.size, 3], dtype=np.uint8)
    ips, cpu_ms = images_per_second(images, processes=args.processes, rounds=args.rounds)
    print(f"albumentations baseline: {ips:.0f} images/s with {args.processes} processes "
          f"at {args.size} px ({cpu_ms:.3f} CPU ms/image)")


if __name__ == "__main__":
    main()
