import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.folder import ImageFolderDataset, NoReadableImages


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _gradient_image(path: Path, size: tuple[int, int] = (48, 32)) -> Path:
    """Left-to-right ramp in red, so crops and flips are visible."""
    width, height = size
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    Image.fromarray(np.stack([ramp, np.zeros_like(ramp), np.zeros_like(ramp)], -1)).save(path)
    return path


def test_txt_captions(tmp_path):
    _image(tmp_path / "b.png", (255, 0, 0))
    _image(tmp_path / "a.jpg", (0, 0, 255))
    (tmp_path / "a.txt").write_text("a blue picture\n")
    (tmp_path / "b.txt").write_text("a red picture")
    dataset = ImageFolderDataset(str(tmp_path), size=16, flip_p=0.0)
    assert dataset.caption_source == "txt" and len(dataset) == 2
    first = dataset[0]
    assert first["caption"] == "a blue picture" and first["file_path_"].endswith("a.jpg")
    assert first["image"].shape == (16, 16, 3) and first["image"].dtype == np.float32
    assert first["image"].min() >= -1 and first["image"].max() <= 1
    np.testing.assert_allclose(first["image"][8, 8], [-1, -1, 1], atol=0.02)  # JPEG: nearly pure blue
    assert dataset[1]["caption"] == "a red picture" and dataset[1]["class_label"] == 0


def test_missing_txt_caption_is_a_clear_error(tmp_path):
    _image(tmp_path / "a.png", (1, 2, 3))
    _image(tmp_path / "b.png", (1, 2, 3))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"needs a \.txt file beside every image.*b\.png.*b\.txt"):
        ImageFolderDataset(str(tmp_path), caption_source="txt")
    # The same folder with "auto" also insists, rather than training on silently empty captions.
    with pytest.raises(FileNotFoundError, match="b.png"):
        ImageFolderDataset(str(tmp_path))


def test_jsonl_metadata_including_nested_folder(tmp_path):
    _image(tmp_path / "one.png", (255, 0, 0))
    _image(tmp_path / "sub" / "two.png", (0, 255, 0))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "one.png", "text": "first"}) + "\n\n")
    # A metadata file in a sub-folder names its images relative to itself (Hugging Face imagefolder).
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "two.png", "text": "second"}) + "\n")
    dataset = ImageFolderDataset(str(tmp_path), size=8)
    assert dataset.caption_source == "jsonl"
    assert [dataset[i]["caption"] for i in range(2)] == ["first", "second"]


def test_csv_metadata(tmp_path):
    _image(tmp_path / "x.png", (0, 0, 0))
    _image(tmp_path / "y.png", (0, 0, 0))
    (tmp_path / "metadata.csv").write_text('file_name,text\nx.png,"hello, world"\ny.png,bye\n')
    dataset = ImageFolderDataset(str(tmp_path), size=8, caption_source="csv")
    assert [dataset[i]["caption"] for i in range(2)] == ["hello, world", "bye"]


def test_metadata_errors_name_the_problem(tmp_path):
    _image(tmp_path / "x.png", (0, 0, 0))
    _image(tmp_path / "y.png", (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageFolderDataset(str(tmp_path), caption_source="jsonl")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "only x"}) + "\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) have no entry in metadata.jsonl \(y\.png\)"):
        ImageFolderDataset(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "caption": "wrong key"}\n')
    with pytest.raises(ValueError, match="line 1: each line needs the keys 'file_name' and 'text'"):
        ImageFolderDataset(str(tmp_path))
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("name,text\nx.png,a\n")
    with pytest.raises(ValueError, match=r"columns 'file_name' and 'text', found \['name', 'text'\]"):
        ImageFolderDataset(str(tmp_path))


def test_class_subfolders(tmp_path):
    for name, colour in (("zebra", (255, 255, 255)), ("aardvark", (0, 0, 0)), ("big_cat", (9, 9, 9))):
        for i in range(2):
            _image(tmp_path / name / f"{i}.png", colour)
    dataset = ImageFolderDataset(str(tmp_path), size=8, class_from_subfolders=True, flip_p=0.0)
    assert dataset.classes == ["aardvark", "big_cat", "zebra"]
    labels = [dataset[i]["class_label"] for i in range(len(dataset))]
    assert labels == [0, 0, 1, 1, 2, 2]
    assert dataset[2]["caption"] == "big cat"  # no caption files: the class name
    _image(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(ValueError, match="sit directly in.*loose.png.*sub-folder"):
        ImageFolderDataset(str(tmp_path), class_from_subfolders=True)


def test_corrupt_image_is_reported_once_and_skipped(tmp_path):
    _image(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "b.png").write_bytes(b"this is not a png")
    _image(tmp_path / "c.png", (0, 255, 0))
    dataset = ImageFolderDataset(str(tmp_path), size=8, caption_source="none", flip_p=0.0)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*b\.png"):
        item = dataset[1]
    assert item["file_path_"].endswith("c.png")  # fell through to the next readable image
    np.testing.assert_allclose(item["image"][0, 0], [-1, 1, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no new warning
        assert dataset[1]["file_path_"].endswith("c.png")
    # Running off the end wraps around.
    (tmp_path / "c.png").write_bytes(b"")
    dataset = ImageFolderDataset(str(tmp_path), size=8, caption_source="none")
    with pytest.warns(UserWarning):
        assert dataset[1]["file_path_"].endswith("a.png")


def test_all_images_unreadable(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    dataset = ImageFolderDataset(str(tmp_path), caption_source="none")
    with pytest.warns(UserWarning), pytest.raises(NoReadableImages, match="none of the 1 images"):
        dataset[0]


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images with extensions.*'extensions'"):
        ImageFolderDataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataset(str(tmp_path / "nope"))
    _image(tmp_path / "a.png", (0, 0, 0))
    with pytest.raises(ValueError, match="unknown caption_source 'text'"):
        ImageFolderDataset(str(tmp_path), caption_source="text")
    with pytest.raises(ValueError, match="unknown crop"):
        ImageFolderDataset(str(tmp_path), crop="middle")
    with pytest.raises(ValueError, match="unknown interpolation"):
        ImageFolderDataset(str(tmp_path), interpolation="cubic")


def test_resize_crop_and_flip(tmp_path):
    _gradient_image(tmp_path / "ramp.png", size=(48, 32))
    centre = ImageFolderDataset(str(tmp_path), size=16, flip_p=0.0, interpolation="bilinear")[0]["image"]
    assert centre.shape == (16, 16, 3)
    red = centre[0, :, 0]
    assert np.all(np.diff(red) > 0)  # still increasing left to right
    # Resized to 24x16, the centre crop starts 4 columns in: the middle of the ramp.
    assert abs(red.mean()) < 0.05
    flipped = ImageFolderDataset(str(tmp_path), size=16, flip_p=1.0, interpolation="bilinear")[0]["image"]
    np.testing.assert_array_equal(flipped, centre[:, ::-1])
    random_crop = ImageFolderDataset(str(tmp_path), size=16, crop="random", flip_p=0.0)
    torch.manual_seed(0)
    crops = [random_crop[0]["image"][0, 0, 0] for _ in range(20)]
    torch.manual_seed(0)
    assert crops == [random_crop[0]["image"][0, 0, 0] for _ in range(20)]  # follows torch's generator
    assert len(set(crops)) > 1
    original = ImageFolderDataset(str(tmp_path), size=None, flip_p=0.0)[0]["image"]
    assert original.shape == (32, 48, 3)


def test_non_rgb_images_are_converted(tmp_path):
    Image.new("L", (10, 10), 255).save(tmp_path / "grey.png")
    Image.new("RGBA", (10, 10), (0, 0, 255, 128)).save(tmp_path / "alpha.png")
    dataset = ImageFolderDataset(str(tmp_path), size=10, caption_source="none", flip_p=0.0)
    assert all(dataset[i]["image"].shape == (10, 10, 3) for i in range(2))
    np.testing.assert_allclose(dataset[1]["image"][0, 0], [1, 1, 1])  # sorted: grey.png second


def test_sixteen_bit_transparent_palette_and_cmyk_images_read_as_they_look(tmp_path):
    from ldm.image_io import load_image

    # 16-bit grey at half range: 8-bit 128, not clipped to white (PIL's convert gives 255).
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "a_grey16.png")
    # Fully transparent red: what a viewer shows is the white behind it.
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "b_clear.png")
    # A palette image whose only colour (black) is marked transparent.
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(tmp_path / "c_palette.png", transparency=0)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "d_cmyk.jpg", quality=100)  # pure red in CMYK
    dataset = ImageFolderDataset(str(tmp_path), size=8, caption_source="none", flip_p=0.0)
    pixels = [(dataset[i]["image"][0, 0] + 1) * 127.5 for i in range(4)]
    np.testing.assert_allclose(pixels[0], [128, 128, 128], atol=1)
    np.testing.assert_allclose(pixels[1], [255, 255, 255], atol=1)
    np.testing.assert_allclose(pixels[2], [255, 255, 255], atol=1)
    np.testing.assert_allclose(pixels[3], [255, 0, 0], atol=3)
    # The scripts' loader reads them the same way.
    np.testing.assert_allclose((load_image(tmp_path / "a_grey16.png")[0, :, 0, 0] + 1) * 127.5, [128] * 3, atol=1)


def test_floating_point_images_are_refused_by_name(tmp_path):
    from ldm.image_io import load_image

    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F").save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match=r"float\.tiff.*floating-point images are not supported"):
        load_image(tmp_path / "float.tiff")


def test_skipped_images_are_counted_across_dataloader_workers(tmp_path):
    for i in range(6):
        _image(tmp_path / f"{i}.png", (255, 0, 0))
    (tmp_path / "2.png").write_bytes(b"broken")
    (tmp_path / "4.png").write_bytes(b"")
    dataset = ImageFolderDataset(str(tmp_path), size=8, caption_source="none", flip_p=0.0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sum(len(batch["image"]) for batch in loader) == 6  # the broken ones replaced by readable neighbours
    # Marked in the workers, seen here (the per-epoch report, ldm.callbacks.SkippedImages, reads this).
    assert [p.name for p in dataset.skipped_files()] == ["2.png", "4.png"]
