//! GGUF v3 writer. Tensor data can be supplied lazily so that multi-gigabyte synthetic models are
//! streamed to disk one tensor at a time instead of being held in memory.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use rayon::prelude::*;

use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, Value, ValueType};
use crate::quant::{self, GgmlType, QuantError};

/// Where a tensor's bytes come from when the file is written.
pub enum TensorData {
    /// Raw bytes already in the tensor's type.
    Bytes(Vec<u8>),
    /// f32 values, quantized to the tensor's type row by row at write time.
    F32(Vec<f32>),
    /// Produces f32 values at write time (called once, when this tensor is reached).
    Lazy(Box<dyn FnOnce() -> Vec<f32> + Send>),
}

struct PendingTensor {
    name: String,
    ty: GgmlType,
    shape: Vec<usize>,
    data: TensorData,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("tensor {name:?}: {problem}")]
    BadTensor { name: String, problem: String },
}

/// The layout [`GgufWriter::header`] computes.
pub struct Header {
    /// Header bytes, padded to the start of the data section.
    pub bytes: Vec<u8>,
    /// Each tensor's offset within the data section.
    pub offsets: Vec<u64>,
    /// Each tensor's size in bytes.
    pub sizes: Vec<u64>,
}

#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a metadata key (replacing an earlier value of the same key).
    pub fn set(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape: &[usize],
        data: TensorData,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.into(),
            ty,
            shape: shape.to_vec(),
            data,
        });
        self
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Writes to `path` atomically: a temporary file beside it is renamed into place only once
    /// complete, so an interrupted write never leaves a truncated model behind.
    pub fn write_file(self, path: impl AsRef<Path>) -> Result<(), WriteError> {
        let path = path.as_ref();
        let tmp = path.with_extension("gguf.tmp");
        let result = (|| {
            let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            self.write_to(&mut out)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Validates the tensors and lays out the file.
    pub fn header(&self) -> Result<Header, WriteError> {
        let alignment = self.alignment();
        let mut sizes = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let bad = |problem: String| WriteError::BadTensor {
                name: t.name.clone(),
                problem,
            };
            if t.shape.is_empty() || t.shape.len() > 4 || t.shape.contains(&0) {
                return Err(bad(format!("invalid shape {:?}", t.shape)));
            }
            let row_bytes = t.ty.row_bytes(t.shape[0]).ok_or_else(|| {
                bad(format!(
                    "row length {} is not a multiple of {}",
                    t.shape[0],
                    t.ty.block_size()
                ))
            })?;
            sizes.push(row_bytes as u64 * t.shape[1..].iter().product::<usize>() as u64);
        }

        let mut out = Vec::new();
        out.extend_from_slice(GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_string(&mut out, k)?;
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            write_value(&mut out, v)?;
        }
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut offset = 0u64;
        for (t, &size) in self.tensors.iter().zip(&sizes) {
            write_string(&mut out, &t.name)?;
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in &t.shape {
                out.extend_from_slice(&(d as u64).to_le_bytes());
            }
            out.extend_from_slice(&(t.ty as u32).to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + size).div_ceil(alignment) * alignment;
        }
        let mut pos = out.len() as u64;
        pad(&mut out, &mut pos, alignment)?;
        Ok(Header {
            bytes: out,
            offsets,
            sizes,
        })
    }

    pub fn write_to(self, out: &mut impl Write) -> Result<(), WriteError> {
        let alignment = self.alignment();
        let Header {
            bytes: header,
            sizes,
            ..
        } = self.header()?;
        out.write_all(&header)?;
        let mut written = 0u64;
        for (t, &size) in self.tensors.into_iter().zip(&sizes) {
            let bytes = match t.data {
                TensorData::Bytes(b) => b,
                TensorData::F32(v) => quantize(&t.name, t.ty, &t.shape, &v)?,
                TensorData::Lazy(f) => quantize(&t.name, t.ty, &t.shape, &f())?,
            };
            if bytes.len() as u64 != size {
                return Err(WriteError::BadTensor {
                    name: t.name,
                    problem: format!("{} bytes supplied, {size} expected", bytes.len()),
                });
            }
            out.write_all(&bytes)?;
            written += size;
            pad(out, &mut written, alignment)?;
        }
        out.flush()?;
        Ok(())
    }
}

fn quantize(name: &str, ty: GgmlType, shape: &[usize], v: &[f32]) -> Result<Vec<u8>, WriteError> {
    let n: usize = shape.iter().product();
    if v.len() != n {
        return Err(WriteError::BadTensor {
            name: name.to_string(),
            problem: format!("{} values supplied for shape {shape:?}", v.len()),
        });
    }
    let row = shape[0];
    let rb = ty.row_bytes(row).expect("checked by write_to");
    let mut out = vec![0u8; rb * (n / row)];
    // Rows are independent; K-quant scale searches make this the slow part of writing a model.
    out.par_chunks_exact_mut(rb)
        .zip(v.par_chunks_exact(row))
        .try_for_each(|(dst, src)| quant::quantize_row(ty, src, dst))?;
    Ok(out)
}

fn pad(out: &mut impl Write, pos: &mut u64, alignment: u64) -> io::Result<()> {
    let target = pos.div_ceil(alignment) * alignment;
    let zeros = [0u8; 256];
    let mut left = target - *pos;
    while left > 0 {
        let n = left.min(zeros.len() as u64);
        out.write_all(&zeros[..n as usize])?;
        left -= n;
    }
    *pos = target;
    Ok(())
}

fn write_string(out: &mut impl Write, s: &str) -> io::Result<u64> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())?;
    Ok(8 + s.len() as u64)
}

/// Writes a value's payload (without its type tag); returns the bytes written.
fn write_value(out: &mut impl Write, v: &Value) -> io::Result<u64> {
    Ok(match v {
        Value::U8(x) => out.write_all(&[*x]).map(|_| 1)?,
        Value::I8(x) => out.write_all(&x.to_le_bytes()).map(|_| 1)?,
        Value::U16(x) => out.write_all(&x.to_le_bytes()).map(|_| 2)?,
        Value::I16(x) => out.write_all(&x.to_le_bytes()).map(|_| 2)?,
        Value::U32(x) => out.write_all(&x.to_le_bytes()).map(|_| 4)?,
        Value::I32(x) => out.write_all(&x.to_le_bytes()).map(|_| 4)?,
        Value::F32(x) => out.write_all(&x.to_le_bytes()).map(|_| 4)?,
        Value::U64(x) => out.write_all(&x.to_le_bytes()).map(|_| 8)?,
        Value::I64(x) => out.write_all(&x.to_le_bytes()).map(|_| 8)?,
        Value::F64(x) => out.write_all(&x.to_le_bytes()).map(|_| 8)?,
        Value::Bool(x) => out.write_all(&[*x as u8]).map(|_| 1)?,
        Value::String(s) => write_string(out, s)?,
        Value::Array(et, items) => {
            let et = if *et == ValueType::Array {
                ValueType::Array
            } else {
                items.first().map_or(*et, |x| x.value_type())
            };
            out.write_all(&(et as u32).to_le_bytes())?;
            out.write_all(&(items.len() as u64).to_le_bytes())?;
            let mut n = 12;
            // Nested arrays carry their own element type tag, which write_value emits.
            for x in items {
                n += write_value(out, x)?;
            }
            n
        }
    })
}

/// Convenience constructors for metadata arrays.
pub fn string_array<S: AsRef<str>>(items: &[S]) -> Value {
    Value::Array(
        ValueType::String,
        items
            .iter()
            .map(|s| Value::String(s.as_ref().to_string()))
            .collect(),
    )
}

pub fn f32_array(items: &[f32]) -> Value {
    Value::Array(
        ValueType::F32,
        items.iter().map(|&x| Value::F32(x)).collect(),
    )
}

pub fn i32_array(items: &[i32]) -> Value {
    Value::Array(
        ValueType::I32,
        items.iter().map(|&x| Value::I32(x)).collect(),
    )
}
