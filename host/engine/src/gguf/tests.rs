use super::writer::{GgufWriter, TensorData, f32_array, string_array};
use super::*;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()))
        .set("llama.block_count", Value::U32(2))
        .set("some.i64", Value::I64(-5))
        .set("some.f64", Value::F64(0.25))
        .set("some.bool", Value::Bool(true))
        .set("tokenizer.ggml.tokens", string_array(&["a", "b", "ç"]))
        .set("tokenizer.ggml.scores", f32_array(&[0.0, -1.0, -2.0]))
        .set(
            "nested",
            Value::Array(
                ValueType::Array,
                vec![
                    Value::Array(ValueType::U8, vec![Value::U8(1), Value::U8(2)]),
                    Value::Array(ValueType::String, vec![]),
                ],
            ),
        );
    w.add_tensor(
        "a",
        GgmlType::F32,
        &[4, 2],
        TensorData::Bytes(f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.])),
    );
    w.add_tensor(
        "b",
        GgmlType::F32,
        &[3],
        TensorData::Bytes(f32_bytes(&[9., 10., 11.])),
    );
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

#[test]
fn round_trip() {
    let f = GgufFile::from_bytes(sample()).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get("some.i64").unwrap().as_i64(), Some(-5));
    assert_eq!(f.get_f64("some.f64").unwrap(), 0.25);
    assert_eq!(f.opt_bool("some.bool").unwrap(), Some(true));
    let toks = f.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(toks[2].as_str(), Some("ç"));
    let nested = f.get("nested").unwrap().as_array().unwrap();
    assert_eq!(nested[0].as_array().unwrap().len(), 2);
    assert_eq!(nested[1], Value::Array(ValueType::String, vec![]));
    let a = f.require_tensor("a").unwrap();
    assert_eq!(a.shape, vec![4, 2]);
    assert_eq!(a.n_rows(), 2);
    assert_eq!(a.row(1), &f32_bytes(&[5., 6., 7., 8.])[..]);
    let b = f.tensor("b").unwrap();
    assert_eq!(b.data(), &f32_bytes(&[9., 10., 11.])[..]);
    assert_eq!(f.tensor_info("b").unwrap().offset % f.alignment, 0);
    assert_eq!(f.data_offset % f.alignment, 0);
}

#[test]
fn typed_getters_report_missing_and_wrong_types() {
    let f = GgufFile::from_bytes(sample()).unwrap();
    let e = f.get_u64("llama.context_length").unwrap_err();
    assert!(e.to_string().contains("llama.context_length"), "{e}");
    let e = f.get_u64("general.architecture").unwrap_err();
    assert!(e.to_string().contains("string"), "{e}");
    assert!(matches!(
        f.require_tensor("nope"),
        Err(GgufError::MissingTensor(_))
    ));
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample();
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    let end = f
        .tensors()
        .iter()
        .map(|t| f.data_offset + t.offset + t.size)
        .max()
        .unwrap();
    // Trailing alignment padding after the last tensor is optional; everything before is not.
    for len in 0..end as usize {
        let r = GgufFile::from_bytes(bytes[..len].to_vec());
        assert!(r.is_err(), "prefix of {len} bytes parsed");
    }
}

#[test]
fn bad_magic_and_version() {
    let mut b = sample();
    b[0] = b'X';
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadMagic(_))
    ));
    let mut b = sample();
    b[4] = 1;
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::UnsupportedVersion(1))
    ));
}

#[test]
fn absurd_counts_are_refused_before_allocation() {
    let mut b = sample();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(matches!(e, GgufError::AbsurdCount { .. }), "{e}");
    let mut b = sample();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(matches!(e, GgufError::AbsurdCount { .. }), "{e}");
    // First key's length.
    let mut b = sample();
    b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(matches!(e, GgufError::AbsurdCount { .. }), "{e}");
}

/// Finds the byte offset of tensor `name`'s type field in `bytes`.
fn tensor_field_offset(bytes: &[u8], name: &str, n_dims: usize) -> usize {
    let needle = [&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat();
    let at = bytes
        .windows(needle.len())
        .rposition(|w| w == needle)
        .unwrap();
    at + needle.len() + 4 + 8 * n_dims
}

#[test]
fn unknown_type_misalignment_and_out_of_range_offsets() {
    let base = sample();
    let ty_at = tensor_field_offset(&base, "b", 1);

    let mut b = base.clone();
    b[ty_at..ty_at + 4].copy_from_slice(&77u32.to_le_bytes());
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(
        matches!(e, GgufError::UnknownTensorType { ty: 77, .. }),
        "{e}"
    );

    let mut b = base.clone();
    b[ty_at + 4..ty_at + 12].copy_from_slice(&33u64.to_le_bytes());
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");

    let mut b = base.clone();
    b[ty_at + 4..ty_at + 12].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(e.to_string().contains("outside the file"), "{e}");

    let mut b = base;
    b[ty_at + 4..ty_at + 12].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(e.to_string().contains("outside the file"), "{e}");
}

#[test]
fn bad_shapes() {
    let base = sample();
    let ty_at = tensor_field_offset(&base, "b", 1);
    // Zero-sized dimension.
    let mut b = base.clone();
    b[ty_at - 8..ty_at].copy_from_slice(&0u64.to_le_bytes());
    assert!(GgufFile::from_bytes(b).is_err());
    // Overflowing element count.
    let mut b = base.clone();
    b[ty_at - 8..ty_at].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(GgufFile::from_bytes(b).is_err());
    // Too many dimensions.
    let mut b = base;
    b[ty_at - 12..ty_at - 8].copy_from_slice(&9u32.to_le_bytes());
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(e.to_string().contains("dimensions"), "{e}");
}

#[test]
fn bad_alignment_key() {
    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U32(24));
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    assert!(matches!(
        GgufFile::from_bytes(out),
        Err(GgufError::BadAlignment(24))
    ));
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U32(64));
    w.add_tensor("x", GgmlType::F32, &[3], TensorData::Bytes(vec![1; 12]));
    w.add_tensor("y", GgmlType::F32, &[1], TensorData::Bytes(vec![2; 4]));
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    let f = GgufFile::from_bytes(out).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(f.tensor_info("y").unwrap().offset, 64);
    assert_eq!(f.tensor("y").unwrap().data(), &[2; 4]);
}

/// A model larger than 4 GiB: a sparse file whose second tensor starts past the 4 GiB mark.
#[test]
fn tensor_offsets_above_4_gib() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = std::env::temp_dir().join(format!("realm-gguf-4g-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("big.gguf");
    let huge_elems = (4usize << 30) / 2 + 2048; // F16: just over 4 GiB of data
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("none".into()));
    w.add_tensor(
        "huge",
        GgmlType::F16,
        &[huge_elems],
        TensorData::Bytes(Vec::new()),
    );
    w.add_tensor("tail", GgmlType::F32, &[4], TensorData::Bytes(Vec::new()));
    let super::writer::Header {
        bytes: header,
        offsets,
        ..
    } = w.header().unwrap();
    assert!(offsets[1] > u32::MAX as u64);
    {
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&header).unwrap();
        file.seek(SeekFrom::Start(header.len() as u64 + offsets[1]))
            .unwrap();
        file.write_all(&f32_bytes(&[1., 2., 3., 4.])).unwrap();
    }
    let f = GgufFile::open(&path).unwrap();
    assert!(f.file_size() > 4 << 30);
    assert_eq!(
        f.tensor("tail").unwrap().data(),
        &f32_bytes(&[1., 2., 3., 4.])[..]
    );
    assert_eq!(f.tensor("huge").unwrap().data().len(), huge_elems * 2);
    // The same header without the sparse tail is refused, naming the tensor.
    let e = GgufFile::from_bytes(header).unwrap_err();
    assert!(e.to_string().contains("huge"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
