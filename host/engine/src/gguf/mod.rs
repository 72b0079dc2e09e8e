//! GGUF reader (v2/v3) over a memory map, and a writer (`writer`).
//!
//! The reader parses the header, metadata and tensor directory eagerly and validates every count,
//! length and offset against the file size before anything is used, so a corrupt or hostile file
//! yields a [`GgufError`] instead of a panic or an out-of-bounds read. Tensor data is never copied:
//! a [`TensorView`] is a (shared mapping, byte range) pair.

pub mod writer;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::quant::GgmlType;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest array-of-arrays nesting we accept; real files use at most 2.
const MAX_ARRAY_DEPTH: u32 = 8;
const MAX_DIMS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (supported: 2 and 3)")]
    UnsupportedVersion(u32),
    #[error(
        "file truncated: needed {needed} bytes at offset {offset} while reading {what}, file has {len}"
    )]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        len: u64,
    },
    #[error("absurd {what}: {value} (at most {max} fit in the file)")]
    AbsurdCount {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("invalid UTF-8 in {what} at offset {offset}")]
    BadUtf8 { what: &'static str, offset: u64 },
    #[error("unknown metadata value type {ty} for key {key:?}")]
    BadValueType { key: String, ty: u32 },
    #[error("metadata arrays nested deeper than {MAX_ARRAY_DEPTH} (key {0:?})")]
    ArrayTooDeep(String),
    #[error("duplicate {what} {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error("tensor {name:?}: unknown tensor type {ty}")]
    UnknownTensorType { name: String, ty: u32 },
    #[error("tensor {name:?}: {problem}")]
    BadTensor { name: String, problem: String },
    #[error("general.alignment must be a non-zero power of two, got {0}")]
    BadAlignment(u64),
    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// One metadata value. Arrays keep their element type so that an empty array still says what it
/// would hold.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Smallest encoded size of one value: bounds array lengths before allocating.
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer type that fits in u64 (metadata writers are not consistent about widths).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(_) | Value::F32(_) | Value::F64(_) => None,
            Value::String(_) | Value::Array(..) => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    /// Short, human-oriented rendering (long arrays are summarised).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) if s.len() > 80 => {
                let cut = (0..=80).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                write!(f, "{:?}… ({} bytes)", &s[..cut], s.len())
            }
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(t, v) if v.len() > 8 => write!(f, "[{}; {}]", t.name(), v.len()),
            Value::Array(_, v) => {
                f.write_str("[")?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{x}")?;
                }
                f.write_str("]")
            }
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// The bytes behind a GGUF: a read-only mapping, or an owned buffer (tests, fuzzing, writer
/// round-trips).
pub enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A tensor's directory entry. `shape[0]` is the contiguous (row) dimension, as in ggml.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    pub shape: Vec<usize>,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Size in bytes, derived from type and shape.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// A zero-copy view of one tensor's bytes, cheap to clone and independent of the `GgufFile`'s
/// lifetime (it holds the mapping alive).
#[derive(Clone)]
pub struct TensorView {
    backing: Arc<Backing>,
    pub name: Arc<str>,
    pub ty: GgmlType,
    pub shape: Vec<usize>,
    start: usize,
    len: usize,
}

impl TensorView {
    pub fn data(&self) -> &[u8] {
        &self.backing[self.start..self.start + self.len]
    }

    /// Elements per row (the contiguous dimension).
    pub fn row_len(&self) -> usize {
        self.shape[0]
    }

    /// Number of rows: the product of all but the first dimension.
    pub fn n_rows(&self) -> usize {
        self.shape[1..].iter().product()
    }

    pub fn row_bytes(&self) -> usize {
        self.len / self.n_rows().max(1)
    }

    pub fn row(&self, i: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data()[i * rb..(i + 1) * rb]
    }
}

impl fmt::Debug for TensorView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} {}", self.name, self.shape, self.ty.name())
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    backing: Arc<Backing>,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos as u64,
                needed: n,
                len: self.buf.len() as u64,
            });
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must be satisfiable by the remaining bytes at `min_each` bytes per item.
    fn count(&mut self, what: &'static str, min_each: u64) -> Result<u64> {
        let v = self.u64(what)?;
        let max = self.remaining() / min_each.max(1);
        if v > max {
            return Err(GgufError::AbsurdCount {
                what,
                value: v,
                max,
            });
        }
        Ok(v)
    }

    fn string(&mut self, what: &'static str) -> Result<String> {
        let len = self.u64(what)?;
        let offset = self.pos as u64;
        if len > self.remaining() {
            return Err(GgufError::AbsurdCount {
                what,
                value: len,
                max: self.remaining(),
            });
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8 { what, offset })
    }

    fn value(&mut self, key: &str, ty: ValueType, depth: u32) -> Result<Value> {
        const W: &str = "metadata value";
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(W)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(W)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(W)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(W)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(W)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(W)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(W)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(W)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(W)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(W)?)),
            ValueType::Bool => Value::Bool(self.array::<1>(W)?[0] != 0),
            ValueType::String => Value::String(self.string("metadata string")?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep(key.to_string()));
                }
                let raw = self.u32("array element type")?;
                let et = ValueType::from_u32(raw).ok_or_else(|| GgufError::BadValueType {
                    key: key.to_string(),
                    ty: raw,
                })?;
                let n = self.count("array length", et.min_size())?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(key, et, depth + 1)?);
                }
                Value::Array(et, items)
            }
        })
    }
}

impl GgufFile {
    /// Maps and parses a file. The mapping stays alive as long as any `TensorView` does.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process. Another process truncating
        // or rewriting the file underneath us is outside what any mmap-based loader can defend
        // against (llama.cpp has the same contract); model files are treated as immutable.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(Backing::Mapped(mmap))
    }

    /// Parses an in-memory GGUF image.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(backing: Backing) -> Result<Self> {
        let file_len = backing.len() as u64;
        let mut c = Cursor {
            buf: &backing,
            pos: 0,
        };
        let magic = c.array::<4>("magic")?;
        if &magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        // A tensor entry takes at least 8 (name len) + 4 (dims) + 8 (one dim) + 4 + 8 bytes.
        let n_tensors = c.count("tensor count", 32)?;
        // A metadata entry takes at least 8 (key len) + 4 (type) + 1 bytes.
        let n_kv = c.count("metadata count", 13)?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let raw = c.u32("metadata type")?;
            let ty = ValueType::from_u32(raw).ok_or_else(|| GgufError::BadValueType {
                key: key.clone(),
                ty: raw,
            })?;
            let value = c.value(&key, ty, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::Duplicate {
                    what: "metadata key",
                    name: key,
                });
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let a = metadata[i].1.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dimension count")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadTensor {
                    name,
                    problem: format!("{n_dims} dimensions (expected 1 to {MAX_DIMS})"),
                });
            }
            let mut shape = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                shape.push(c.u64("tensor dimension")?);
            }
            let raw_ty = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            let ty = GgmlType::from_u32(raw_ty).ok_or_else(|| GgufError::UnknownTensorType {
                name: name.clone(),
                ty: raw_ty,
            })?;
            let bad = |problem: String| GgufError::BadTensor {
                name: name.clone(),
                problem,
            };
            if shape.contains(&0) {
                return Err(bad(format!("zero-sized dimension in {shape:?}")));
            }
            let n_el = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
            let (bs, ts) = (ty.block_size() as u64, ty.type_size() as u64);
            if shape[0] % bs != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {} block size {bs}",
                    shape[0],
                    ty.name()
                )));
            }
            let row_bytes = (shape[0] / bs)
                .checked_mul(ts)
                .ok_or_else(|| bad("row size overflows".into()))?;
            let size = row_bytes
                .checked_mul(n_el / shape[0])
                .ok_or_else(|| bad("byte size overflows".into()))?;
            if size > file_len {
                return Err(bad(format!(
                    "needs {size} bytes but the file has only {file_len}"
                )));
            }
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "offset {offset} is not aligned to {alignment}"
                )));
            }
            let shape = shape.iter().map(|&d| d as usize).collect();
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Duplicate {
                    what: "tensor",
                    name,
                });
            }
            tensors.push(TensorInfo {
                name,
                ty,
                shape,
                offset,
                size,
            });
        }

        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(GgufError::BadTensor {
                        name: t.name.clone(),
                        problem: format!(
                            "data [{} + {}, {} bytes) lies outside the file ({file_len} bytes)",
                            data_offset, t.offset, t.size
                        ),
                    });
                }
            }
        }

        Ok(GgufFile {
            backing: Arc::new(backing),
            version,
            alignment,
            data_offset,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    /// Total size of the underlying file or buffer in bytes.
    pub fn file_size(&self) -> u64 {
        self.backing.len() as u64
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView> {
        let t = self.tensor_info(name)?;
        Some(TensorView {
            backing: self.backing.clone(),
            name: t.name.as_str().into(),
            ty: t.ty,
            shape: t.shape.clone(),
            start: (self.data_offset + t.offset) as usize,
            len: t.size as usize,
        })
    }

    pub fn require_tensor(&self, name: &str) -> Result<TensorView> {
        self.tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    fn wrong(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: self.get(key).map_or("nothing", |v| v.value_type().name()),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.require(key)?
            .as_str()
            .ok_or_else(|| self.wrong(key, "string"))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| self.wrong(key, "unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.require(key)?
            .as_f64()
            .ok_or_else(|| self.wrong(key, "number"))
    }

    /// Optional keys: absent is `Ok(None)`, present with the wrong type is still an error.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "integer")),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "number")),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong(key, "bool")),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "string")),
        }
    }

    /// `general.architecture`, which prefixes every model hyperparameter key.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }
}

#[cfg(test)]
mod tests;
