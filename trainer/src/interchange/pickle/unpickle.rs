//! The pickle machine, without its danger: Python's unpickler imports whatever module a
//! `GLOBAL` names and calls whatever a `REDUCE` hands it, which is how a pickle runs code. Here
//! a `GLOBAL` is looked up in an allow-list ([`Global`]) and anything else is an error naming
//! it, before a single byte more is read; a `REDUCE` can only apply an allowed callable, and
//! each of those is a plain Rust function building a value (a tensor's description, an
//! ordered dict, a tuple). The list is `torch.load(weights_only=True)`'s
//! (torch/_weights_only_unpickler.py): tensors and their storages in every dtype, `OrderedDict`,
//! `torch.Size`, sets, plain values; and, for TorchScript archives only, TorchScript's module
//! classes (`__torch__.*`) as plain holders of attributes, never run.
//!
//! Every length read from the input is checked against what is left of the input before
//! anything is allocated, so a forged length is an error, not an allocation. Tensors are
//! described ([`TensorRef`]: storage, offset, size, stride), checked against their storage's
//! declared size, and made later by the format that holds the storages (`mod.rs`), so a
//! storage nobody needs is never read.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::rc::Rc;

use tch::Kind;

/// A value the machine builds. Containers are shared (`Rc`) as Python's are: a list or dict
/// remembered in the memo and filled afterwards is the same one wherever it is fetched.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for 64 bits (the legacy format's magic number): its
    /// little-endian two's-complement bytes, as `LONG1` / `LONG4` give them.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Tuple),
    List(Shared<Vec<Value>>),
    Dict(Shared<Dict>),
    /// An allowed global, not yet applied.
    Global(Rc<Global>),
    /// A storage, as the format's persistent id names it.
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// A TorchScript module (`__torch__.*`): its class name and attributes, nothing more.
    Object(Shared<Object>),
}

/// A mutable container shared as Python shares it, dropped without recursion: a pickle of a
/// few megabytes can nest a million lists, and dropping that as nested values would overflow
/// the stack. Its last owner moves its contents onto a work list instead ([`dismantle`]).
#[derive(Debug, Default)]
pub struct Shared<T: Contents>(Rc<RefCell<T>>);

/// A tuple, dropped without recursion as [`Shared`] is.
#[derive(Debug)]
pub struct Tuple(Rc<[Value]>);

/// What a container holds, moved out for [`dismantle`].
pub trait Contents: Default {
    fn drain_into(&mut self, work: &mut Vec<Value>);
}

impl Contents for Vec<Value> {
    fn drain_into(&mut self, work: &mut Vec<Value>) {
        work.append(self);
    }
}

impl Contents for Dict {
    fn drain_into(&mut self, work: &mut Vec<Value>) {
        for (k, v) in self.items.drain(..) {
            work.push(k);
            work.push(v);
        }
        self.index.clear();
    }
}

impl Contents for Object {
    fn drain_into(&mut self, work: &mut Vec<Value>) {
        self.attributes.drain_into(work);
    }
}

impl<T: Contents> Shared<T> {
    fn new(contents: T) -> Self {
        Shared(Rc::new(RefCell::new(contents)))
    }

    /// Moves the contents onto `work` when this is the last owner.
    fn take_if_last(&self, work: &mut Vec<Value>) {
        if Rc::strong_count(&self.0) == 1 {
            if let Ok(mut contents) = self.0.try_borrow_mut() {
                contents.drain_into(work);
            }
        }
    }
}

impl<T: Contents> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<T: Contents> std::ops::Deref for Shared<T> {
    type Target = RefCell<T>;
    fn deref(&self) -> &RefCell<T> {
        &self.0
    }
}

impl<T: Contents> Drop for Shared<T> {
    fn drop(&mut self) {
        let mut work = Vec::new();
        self.take_if_last(&mut work);
        dismantle(work);
    }
}

impl Tuple {
    fn take_if_last(&mut self, work: &mut Vec<Value>) {
        if let Some(items) = Rc::get_mut(&mut self.0) {
            work.extend(items.iter_mut().map(|v| std::mem::replace(v, Value::None)));
        }
    }
}

impl From<Vec<Value>> for Tuple {
    fn from(items: Vec<Value>) -> Self {
        Tuple(items.into())
    }
}

impl Clone for Tuple {
    fn clone(&self) -> Self {
        Tuple(self.0.clone())
    }
}

impl std::ops::Deref for Tuple {
    type Target = [Value];
    fn deref(&self) -> &[Value] {
        &self.0
    }
}

impl Drop for Tuple {
    fn drop(&mut self) {
        let mut work = Vec::new();
        self.take_if_last(&mut work);
        dismantle(work);
    }
}

/// Drops `work` and everything only it owns, one value at a time: each container's contents
/// are moved onto the list before the container itself drops, so no drop ever recurses.
fn dismantle(mut work: Vec<Value>) {
    while let Some(mut v) = work.pop() {
        match &mut v {
            Value::Tuple(t) => t.take_if_last(&mut work),
            Value::List(l) => l.take_if_last(&mut work),
            Value::Dict(d) => d.take_if_last(&mut work),
            Value::Object(o) => o.take_if_last(&mut work),
            _ => {}
        }
    }
}

/// A dict in insertion order (Python's dicts and `OrderedDict` keep it), with an index over
/// its string and integer keys so that filling a large one stays linear.
#[derive(Debug, Default)]
pub struct Dict {
    pub items: Vec<(Value, Value)>,
    index: HashMap<Key, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Str(Rc<str>),
    Int(i64),
}

impl Dict {
    fn insert(&mut self, key: Value, value: Value) {
        let k = match &key {
            Value::Str(s) => Some(Key::Str(s.clone())),
            Value::Int(i) => Some(Key::Int(*i)),
            _ => None,
        };
        match k.as_ref().and_then(|k| self.index.get(k)) {
            Some(&at) => self.items[at].1 = value,
            None => {
                if let Some(k) = k {
                    self.index.insert(k, self.items.len());
                }
                self.items.push((key, value));
            }
        }
    }

    /// The value under the string key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(&Key::Str(key.into())).map(|&at| &self.items[at].1)
    }

    /// The value under the integer key `key`.
    pub fn get_int(&self, key: i64) -> Option<&Value> {
        self.index.get(&Key::Int(key)).map(|&at| &self.items[at].1)
    }
}

/// A TorchScript module object: `__torch__.<qualified class name>` and its attributes.
#[derive(Debug, Default)]
pub struct Object {
    pub class: String,
    pub attributes: Dict,
}

/// What an allowed `GLOBAL` names.
#[derive(Debug, Clone, PartialEq)]
pub enum Global {
    /// `collections.OrderedDict`: called with no arguments (or a list of pairs) it is a dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    /// backward_hooks[, metadata])`, what `torch.save` writes for every tensor.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor(storage, offset, size, stride)`, older files.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)`: an
    /// `nn.Parameter`, which is its data.
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state(data, requires_grad, hooks, state)`.
    RebuildParameterWithState,
    /// `torch.FloatStorage`, `torch.HalfStorage`, ...: the dtype of a storage, only ever an
    /// argument of a persistent id.
    StorageType(StorageKind),
    /// `torch.Size(tuple)`.
    TorchSize,
    /// `builtins.set` / `frozenset` (a list here).
    Set,
    /// `_codecs.encode(text, "latin1")`: how protocol 2 writes `bytes`.
    Encode,
    /// `torch.device(name)` (a string here).
    Device,
    /// TorchScript's list and type-tag helpers (`torch.jit._pickle.*`): each returns its
    /// first argument.
    FirstArgument(&'static str),
    /// A TorchScript module class (`__torch__.*`), allowed in TorchScript archives only.
    ScriptClass(String),
}

/// The dtype of a storage, from its `torch.*Storage` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageKind {
    pub kind: Kind,
    pub name: &'static str,
}

impl StorageKind {
    /// Bytes per element.
    pub fn element_size(self) -> u64 {
        self.kind.elt_size_in_bytes() as u64
    }

    fn of(name: &str) -> Option<Self> {
        let (name, kind) = match name {
            "DoubleStorage" => ("DoubleStorage", Kind::Double),
            "FloatStorage" => ("FloatStorage", Kind::Float),
            "HalfStorage" => ("HalfStorage", Kind::Half),
            "BFloat16Storage" => ("BFloat16Storage", Kind::BFloat16),
            "LongStorage" => ("LongStorage", Kind::Int64),
            "IntStorage" => ("IntStorage", Kind::Int),
            "ShortStorage" => ("ShortStorage", Kind::Int16),
            "CharStorage" => ("CharStorage", Kind::Int8),
            "ByteStorage" => ("ByteStorage", Kind::Uint8),
            "BoolStorage" => ("BoolStorage", Kind::Bool),
            "ComplexFloatStorage" => ("ComplexFloatStorage", Kind::ComplexFloat),
            "ComplexDoubleStorage" => ("ComplexDoubleStorage", Kind::ComplexDouble),
            "UntypedStorage" => ("UntypedStorage", Kind::Uint8),
            _ => return None,
        };
        Some(StorageKind { kind, name })
    }
}

/// A storage as a persistent id names it, its size already checked against the archive by
/// the format that resolved it.
#[derive(Debug)]
pub struct StorageRef {
    /// The key under which the format finds its bytes (`data/<key>` in a zip).
    pub key: String,
    pub kind: StorageKind,
    /// Elements.
    pub numel: u64,
}

/// The storages a file names, one [`StorageRef`] per key, so that views of one storage share
/// it; a key named again must agree on type and size.
#[derive(Default)]
pub struct StorageTable(pub HashMap<String, Rc<StorageRef>>);

impl StorageTable {
    /// The storage a persistent id names (`('storage', torch.<Type>Storage, key, location,
    /// numel)`, and under the legacy format a sixth item, the view of another storage, which
    /// must be `None`): `check(kind, key, numel)` runs the first time a key is named.
    pub fn name(
        &mut self,
        pid: &Value,
        legacy: bool,
        check: impl FnOnce(StorageKind, &str, u64) -> Result<(), String>,
    ) -> Result<Value, String> {
        let (kind, key, numel) = storage_id(pid, legacy)?;
        if let Some(seen) = self.0.get(&key) {
            if seen.kind != kind || seen.numel != numel {
                return Err(format!("storage {key} is named twice with different types or sizes"));
            }
            return Ok(Value::Storage(seen.clone()));
        }
        check(kind, &key, numel)?;
        let storage = Rc::new(StorageRef { key: key.clone(), kind, numel });
        self.0.insert(key, storage.clone());
        Ok(Value::Storage(storage))
    }
}

fn storage_id(pid: &Value, legacy: bool) -> Result<(StorageKind, String, u64), String> {
    let shape = if legacy {
        "('storage', type, key, location, numel, view)"
    } else {
        "('storage', type, key, location, numel)"
    };
    let Value::Tuple(items) = pid else {
        return Err(format!("a persistent id of {}", kind(pid)));
    };
    let (tag, g, key, numel, view) = match &items[..] {
        [Value::Str(t), Value::Global(g), Value::Str(k), Value::Str(_), Value::Int(n)]
            if !legacy =>
        {
            (t, g, k, n, None)
        }
        [Value::Str(t), Value::Global(g), Value::Str(k), Value::Str(_), Value::Int(n), v]
            if legacy =>
        {
            (t, g, k, n, Some(v))
        }
        _ => return Err(format!("a persistent id other than {shape}")),
    };
    if &**tag != "storage" {
        return Err(format!("a persistent id other than {shape}"));
    }
    let Global::StorageType(storage_kind) = &**g else {
        return Err(format!("a storage of type {g:?}"));
    };
    if view.is_some_and(|v| !matches!(v, Value::None)) {
        return Err(format!(
            "storage {key} is a view of another (PyTorch before 0.4), which oxclip does not read"
        ));
    }
    let numel = u64::try_from(*numel).map_err(|_| format!("storage {key} of {numel} elements"))?;
    Ok((*storage_kind, key.to_string(), numel))
}

/// A tensor as a view of a storage, checked to lie inside it.
#[derive(Debug)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// Whether `module.name` may be built, and as what. `torchscript`: the pickle is a
/// TorchScript archive's, whose module objects are `__torch__.*` classes.
pub fn allowed_global(module: &str, name: &str, torchscript: bool) -> Result<Global, String> {
    let global = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", "Size") => Global::TorchSize,
        ("torch", "device") => Global::Device,
        ("builtins" | "__builtin__", "set" | "frozenset") => Global::Set,
        ("_codecs", "encode") => Global::Encode,
        ("torch.jit._pickle", "restore_type_tag") => Global::FirstArgument("restore_type_tag"),
        ("torch.jit._pickle", "build_intlist") => Global::FirstArgument("build_intlist"),
        ("torch.jit._pickle", "build_doublelist") => Global::FirstArgument("build_doublelist"),
        ("torch.jit._pickle", "build_boollist") => Global::FirstArgument("build_boollist"),
        ("torch.jit._pickle", "build_tensorlist") => Global::FirstArgument("build_tensorlist"),
        ("torch", storage) if StorageKind::of(storage).is_some() => {
            Global::StorageType(StorageKind::of(storage).ok_or("unreachable")?)
        }
        (m, n) if torchscript && (m == "__torch__" || m.starts_with("__torch__.")) => {
            Global::ScriptClass(format!("{m}.{n}"))
        }
        _ => return Err(refusal(module, name)),
    };
    Ok(global)
}

fn refusal(module: &str, name: &str) -> String {
    // Protocol 2 writes Python 3's builtins under their Python 2 name; name what would run.
    let module = if module == "__builtin__" { "builtins" } else { module };
    let hint = if module.starts_with("torch.nn") || module.starts_with("__main__") {
        " (a whole pickled object, as `torch.save(model)` writes: save its `state_dict()` instead)"
    } else if module.starts_with("__torch__") {
        " (a TorchScript class outside a TorchScript archive)"
    } else {
        ""
    };
    format!(
        "refuses the global {module}.{name}{hint}: oxclip reads only tensors, their storages and \
         plain values from a pickle, as torch.load(weights_only=True) does, and never runs \
         anything a pickle names"
    )
}

/// Reads one pickle from `input` (at most `limit` bytes of it): `persistent` resolves each
/// persistent id (the format's storages), `torchscript` allows TorchScript's module classes.
pub fn load<R: Read>(
    input: R,
    limit: u64,
    torchscript: bool,
    persistent: &mut dyn FnMut(Value) -> Result<Value, String>,
) -> Result<Value, String> {
    let mut machine = Machine {
        input: Input { reader: input, left: limit, position: 0 },
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        torchscript,
        persistent,
    };
    machine.run().map_err(|e| format!("pickle byte {}: {e}", machine.input.position))
}

/// The input, counting what is read and what is left, so a declared length is checked before
/// it is allocated.
struct Input<R> {
    reader: R,
    left: u64,
    position: u64,
}

impl<R: Read> Input<R> {
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, String> {
        if n > self.left {
            return Err(format!(
                "a length of {n} bytes, and only {} are left: damaged or truncated",
                self.left
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.reader.read_exact(&mut buf).map_err(|e| format!("truncated ({e})"))?;
        self.left -= n;
        self.position += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        if (N as u64) > self.left {
            return Err("truncated: the pickle ends before its STOP".into());
        }
        let mut buf = [0u8; N];
        self.reader.read_exact(&mut buf).map_err(|e| format!("truncated ({e})"))?;
        self.left -= N as u64;
        self.position += N as u64;
        Ok(buf)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A text line of protocol 0 (up to and without its `\n`), at most 64 KiB.
    fn line(&mut self) -> Result<String, String> {
        const MAX_LINE: usize = 64 << 10;
        let mut out = Vec::new();
        loop {
            match self.u8()? {
                b'\n' => break,
                b => out.push(b),
            }
            if out.len() > MAX_LINE {
                return Err("a text line over 64 KiB".into());
            }
        }
        String::from_utf8(out).map_err(|_| "a text line that is not UTF-8".into())
    }
}

struct Machine<'p, R> {
    input: Input<R>,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    torchscript: bool,
    persistent: &'p mut dyn FnMut(Value) -> Result<Value, String>,
}

impl<R: Read> Machine<'_, R> {
    fn run(&mut self) -> Result<Value, String> {
        loop {
            let op = self.input.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let proto = self.input.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto}, newer than 5"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.input.u64()?;
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?.clone();
                    self.stack.push(top);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'I' => {
                    let line = self.input.line()?;
                    let v = match line.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.parse().map_err(|_| format!("INT {s:?}"))?),
                    };
                    self.stack.push(v);
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.input.array()?);
                    self.stack.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.input.u8()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = self.input.u16()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'L' => {
                    let line = self.input.line()?;
                    let digits = line.trim_end_matches('L');
                    let v = digits.parse::<i64>().map_err(|_| format!("LONG {digits:?}"))?;
                    self.stack.push(Value::Int(v));
                }
                0x8a => {
                    // LONG1
                    let n = self.input.u8()?;
                    let bytes = self.input.bytes(n.into())?;
                    self.stack.push(long(bytes));
                }
                0x8b => {
                    // LONG4
                    let n = self.input.u32()?;
                    let bytes = self.input.bytes(n.into())?;
                    self.stack.push(long(bytes));
                }
                b'F' => {
                    let line = self.input.line()?;
                    let v = line.parse::<f64>().map_err(|_| format!("FLOAT {line:?}"))?;
                    self.stack.push(Value::Float(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.input.array()?);
                    self.stack.push(Value::Float(v));
                }
                b'S' => {
                    // STRING: a quoted Python 2 str repr; only plain quoted text is taken.
                    let line = self.input.line()?;
                    let inner = line
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| line.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                        .filter(|s| !s.contains('\\'))
                        .ok_or_else(|| format!("STRING {line:?}"))?;
                    self.stack.push(Value::Str(inner.into()));
                }
                b'T' => {
                    let n = self.input.u32()?;
                    let bytes = self.input.bytes(n.into())?;
                    self.stack.push(latin1(&bytes));
                }
                b'U' => {
                    let n = self.input.u8()?;
                    let bytes = self.input.bytes(n.into())?;
                    self.stack.push(latin1(&bytes));
                }
                b'B' => {
                    let n = self.input.u32()?;
                    let bytes = self.input.bytes(n.into())?;
                    self.stack.push(Value::Bytes(bytes.into()));
                }
                b'C' => {
                    let n = self.input.u8()?;
                    let bytes = self.input.bytes(n.into())?;
                    self.stack.push(Value::Bytes(bytes.into()));
                }
                0x8e => {
                    let n = self.input.u64()?;
                    let bytes = self.input.bytes(n)?;
                    self.stack.push(Value::Bytes(bytes.into()));
                }
                b'V' => {
                    let line = self.input.line()?;
                    self.stack.push(Value::Str(line.into()));
                }
                b'X' => {
                    let n = self.input.u32()?;
                    let s = self.utf8(n.into())?;
                    self.stack.push(s);
                }
                0x8c => {
                    let n = self.input.u8()?;
                    let s = self.utf8(n.into())?;
                    self.stack.push(s);
                }
                0x8d => {
                    let n = self.input.u64()?;
                    let s = self.utf8(n)?;
                    self.stack.push(s);
                }
                b')' => self.stack.push(Value::Tuple(Vec::new().into())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items.into()));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err("TUPLE of an empty stack".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items.into()));
                }
                b']' => self.stack.push(Value::List(Shared::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Shared::new(items)));
                }
                b'a' => {
                    let item = self.pop()?;
                    self.list_top()?.borrow_mut().push(item);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.list_top()?.borrow_mut().extend(items);
                }
                b'}' => self.stack.push(Value::Dict(Shared::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = Shared::new(pairs(items)?);
                    self.stack.push(Value::Dict(dict));
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.dict_top()?.borrow_mut().insert(key, value);
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.dict_top()?;
                    let mut dict = dict.borrow_mut();
                    for (k, v) in pairs(items)?.items {
                        dict.insert(k, v);
                    }
                }
                0x8f => self.stack.push(Value::List(Shared::default())), // EMPTY_SET
                0x90 => {
                    // ADDITEMS
                    let items = self.pop_mark()?;
                    self.list_top()?.borrow_mut().extend(items);
                }
                0x91 => {
                    // FROZENSET
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Shared::new(items)));
                }
                b'c' => {
                    let module = self.input.line()?;
                    let name = self.input.line()?;
                    self.global(&module, &name)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                        _ => return Err("STACK_GLOBAL of values that are not strings".into()),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let v = self.new_object(class, args)?;
                    self.stack.push(v);
                }
                0x92 => {
                    // NEWOBJ_EX
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let v = self.new_object(class, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    self.build(state)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = (self.persistent)(pid)?;
                    self.stack.push(v);
                }
                b'P' => {
                    let pid = self.input.line()?;
                    let v = (self.persistent)(Value::Str(pid.into()))?;
                    self.stack.push(v);
                }
                b'g' => {
                    let line = self.input.line()?;
                    let at = line.parse().map_err(|_| format!("GET {line:?}"))?;
                    self.get(at)?;
                }
                b'h' => {
                    let at = self.input.u8()?;
                    self.get(at.into())?;
                }
                b'j' => {
                    let at = self.input.u32()?;
                    self.get(at)?;
                }
                b'p' => {
                    let line = self.input.line()?;
                    let at = line.parse().map_err(|_| format!("PUT {line:?}"))?;
                    self.put(at)?;
                }
                b'q' => {
                    let at = self.input.u8()?;
                    self.put(at.into())?;
                }
                b'r' => {
                    let at = self.input.u32()?;
                    self.put(at)?;
                }
                0x94 => {
                    // MEMOIZE
                    let at = u32::try_from(self.memo.len()).map_err(|_| "memo too large")?;
                    self.put(at)?;
                }
                b'i' | b'o' => {
                    return Err(
                        "INST/OBJ (a class called by name): refused; torch.save never writes it"
                            .into(),
                    )
                }
                0x82..=0x84 => {
                    return Err("EXT1/EXT2/EXT4 (globals from the copyreg registry): refused".into())
                }
                0x96..=0x98 => return Err("out-of-band buffers (protocol 5): refused".into()),
                other => return Err(format!("unknown opcode 0x{other:02x}: not a pickle")),
            }
        }
    }

    fn utf8(&mut self, n: u64) -> Result<Value, String> {
        let bytes = self.input.bytes(n)?;
        let s = String::from_utf8(bytes).map_err(|_| "a string that is not UTF-8")?;
        Ok(Value::Str(s.into()))
    }

    fn pop(&mut self) -> Result<Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("popped past a MARK".into());
        }
        self.stack.pop().ok_or_else(|| "popped an empty stack".into())
    }

    fn top(&self) -> Result<&Value, String> {
        self.stack.last().ok_or_else(|| "an empty stack".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.marks.pop().ok_or("no MARK to pop to")?;
        if mark > self.stack.len() {
            return Err("a MARK above the stack".into());
        }
        Ok(self.stack.split_off(mark))
    }

    fn list_top(&self) -> Result<Shared<Vec<Value>>, String> {
        match self.top()? {
            Value::List(l) => Ok(l.clone()),
            other => Err(format!("APPEND to {}", kind(other))),
        }
    }

    fn dict_top(&self) -> Result<Shared<Dict>, String> {
        match self.top()? {
            Value::Dict(d) => Ok(d.clone()),
            other => Err(format!("SETITEM on {}", kind(other))),
        }
    }

    fn get(&mut self, at: u32) -> Result<(), String> {
        let v = self.memo.get(&at).ok_or_else(|| format!("memo {at} was never set"))?.clone();
        self.stack.push(v);
        Ok(())
    }

    fn put(&mut self, at: u32) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(at, v);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), String> {
        let g = allowed_global(module, name, self.torchscript)?;
        self.stack.push(Value::Global(Rc::new(g)));
        Ok(())
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value, String> {
        let Value::Global(global) = callable else {
            return Err(format!("REDUCE calls {}, not an allowed global", kind(&callable)));
        };
        let args = match args {
            Value::Tuple(items) => items,
            other => return Err(format!("REDUCE with {} for arguments", kind(&other))),
        };
        let arg =
            |i: usize| args.get(i).ok_or_else(|| format!("{global:?} needs {} arguments", i + 1));
        Ok(match &*global {
            Global::OrderedDict => match &*args {
                [] => Value::Dict(Shared::default()),
                [Value::List(items)] => {
                    let mut dict = Dict::default();
                    for pair in items.borrow().iter() {
                        match pair {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                dict.insert(kv[0].clone(), kv[1].clone())
                            }
                            _ => return Err("OrderedDict of something not a pair".into()),
                        }
                    }
                    Value::Dict(Shared::new(dict))
                }
                _ => return Err("OrderedDict with unexpected arguments".into()),
            },
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                let storage = match arg(0)? {
                    Value::Storage(s) => s.clone(),
                    other => return Err(format!("a tensor of {}, not a storage", kind(other))),
                };
                let offset = int(arg(1)?, "a tensor's storage offset")?;
                let size = ints(arg(2)?, "a tensor's size")?;
                let stride = ints(arg(3)?, "a tensor's stride")?;
                Value::Tensor(Rc::new(view(storage, offset, size, stride)?))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match arg(0)? {
                t @ Value::Tensor(_) => t.clone(),
                other => return Err(format!("a parameter of {}, not a tensor", kind(other))),
            },
            Global::TorchSize => match arg(0)? {
                Value::Tuple(t) => Value::Tuple(t.clone()),
                Value::List(l) => Value::Tuple(l.borrow().clone().into()),
                other => return Err(format!("torch.Size of {}", kind(other))),
            },
            Global::Set => match args.first() {
                None => Value::List(Shared::default()),
                Some(Value::List(l)) => Value::List(Shared::new(l.borrow().clone())),
                Some(Value::Tuple(t)) => Value::List(Shared::new(t.to_vec())),
                Some(other) => return Err(format!("set of {}", kind(other))),
            },
            Global::Encode => match (arg(0)?, args.get(1)) {
                (Value::Str(s), Some(Value::Str(enc))) if &**enc == "latin1" => {
                    let bytes: Option<Vec<u8>> =
                        s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                    Value::Bytes(bytes.ok_or("_codecs.encode of text beyond latin1")?.into())
                }
                _ => return Err("_codecs.encode other than (text, \"latin1\")".into()),
            },
            Global::Device => match arg(0)? {
                s @ Value::Str(_) => s.clone(),
                other => return Err(format!("torch.device of {}", kind(other))),
            },
            Global::FirstArgument(_) => arg(0)?.clone(),
            Global::StorageType(s) => {
                return Err(format!("torch.{} called: storages come from persistent ids", s.name))
            }
            Global::ScriptClass(c) => {
                return Err(format!("{c} called: TorchScript objects are only created empty"))
            }
        })
    }

    /// `cls.__new__(cls, *args)`: a TorchScript module object, or an empty dict.
    fn new_object(&mut self, class: Value, args: Value) -> Result<Value, String> {
        let empty = matches!(&args, Value::Tuple(t) if t.is_empty());
        match class {
            Value::Global(g) => match &*g {
                Global::ScriptClass(c) if empty => Ok(Value::Object(Shared::new(Object {
                    class: c.clone(),
                    attributes: Dict::default(),
                }))),
                Global::OrderedDict if empty => Ok(Value::Dict(Shared::default())),
                other => Err(format!("NEWOBJ of {other:?} with arguments: refused")),
            },
            other => Err(format!("NEWOBJ of {}", kind(&other))),
        }
    }

    /// `obj.__setstate__(state)` or `obj.__dict__.update(state)`: attributes of a TorchScript
    /// object; on a dict (an `OrderedDict`'s `_metadata`) or a tensor (a parameter's
    /// attributes) they carry no weights and are dropped.
    fn build(&mut self, state: Value) -> Result<(), String> {
        match self.top()? {
            Value::Object(object) => {
                let Value::Dict(state) = state else {
                    return Err(format!(
                        "BUILD of {} with {}",
                        object.borrow().class,
                        kind(&state)
                    ));
                };
                let state = state.borrow();
                let mut object = object.borrow_mut();
                for (k, v) in &state.items {
                    object.attributes.insert(k.clone(), v.clone());
                }
                Ok(())
            }
            Value::Dict(_) | Value::Tensor(_) => Ok(()),
            other => Err(format!("BUILD on {}", kind(other))),
        }
    }
}

/// A tensor of `size` and `stride` from `offset` into `storage`, every element of which must
/// lie inside the storage.
fn view(
    storage: Rc<StorageRef>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
) -> Result<TensorRef, String> {
    if size.len() != stride.len() {
        return Err(format!("a tensor of size {size:?} with stride {stride:?}"));
    }
    if offset < 0 || size.iter().chain(&stride).any(|&d| d < 0) {
        return Err(format!(
            "a tensor with a negative offset, size or stride ({offset}, {size:?}, {stride:?})"
        ));
    }
    let out_of = || {
        format!(
            "a tensor of size {size:?}, stride {stride:?} at offset {offset} reaches past the end of its storage {} ({} elements): damaged",
            storage.key, storage.numel
        )
    };
    // The last element it reaches: offset + sum((size_i - 1) * stride_i), or none when empty.
    let mut last = Some(offset as u64);
    let mut numel: u64 = 1;
    for (&n, &s) in size.iter().zip(&stride) {
        numel = numel.checked_mul(n as u64).ok_or_else(out_of)?;
        if n == 0 {
            last = None;
        } else if let Some(l) = last {
            last = (n as u64 - 1).checked_mul(s as u64).and_then(|x| x.checked_add(l));
            if last.is_none() {
                return Err(out_of());
            }
        }
    }
    match last {
        Some(l) if l >= storage.numel => return Err(out_of()),
        None if offset as u64 > storage.numel => return Err(out_of()),
        _ => {}
    }
    // More elements than its storage holds means views that overlap (a zero stride: an
    // `expand`): no weights file has them, and copying one could take any amount of memory.
    if numel > storage.numel {
        return Err(format!(
            "a tensor of size {size:?}, stride {stride:?} has more elements than its storage {} ({}): overlapping views are refused",
            storage.key, storage.numel
        ));
    }
    Ok(TensorRef { storage, offset, size, stride })
}

fn long(bytes: Vec<u8>) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() <= 8 {
        // Sign-extend the little-endian two's complement.
        let fill = if bytes[bytes.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
        let mut buf = [fill; 8];
        buf[..bytes.len()].copy_from_slice(&bytes);
        return Value::Int(i64::from_le_bytes(buf));
    }
    Value::BigInt(bytes.into())
}

fn latin1(bytes: &[u8]) -> Value {
    Value::Str(bytes.iter().map(|&b| char::from(b)).collect::<String>().into())
}

fn pairs(items: Vec<Value>) -> Result<Dict, String> {
    if !items.len().is_multiple_of(2) {
        return Err("a dict of an odd number of items".into());
    }
    let mut dict = Dict::default();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        dict.insert(k, v);
    }
    Ok(dict)
}

fn int(v: &Value, what: &str) -> Result<i64, String> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(format!("{what} is {}, not an integer", kind(other))),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>, String> {
    let items = match v {
        Value::Tuple(t) => t.to_vec(),
        Value::List(l) => l.borrow().clone(),
        other => return Err(format!("{what} is {}, not a tuple", kind(other))),
    };
    items.iter().map(|i| int(i, what)).collect()
}

/// What a value is, for messages.
pub fn kind(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(_) => "a bool".into(),
        Value::Int(_) | Value::BigInt(_) => "an integer".into(),
        Value::Float(_) => "a float".into(),
        Value::Str(_) => "a string".into(),
        Value::Bytes(_) => "bytes".into(),
        Value::Tuple(_) => "a tuple".into(),
        Value::List(_) => "a list".into(),
        Value::Dict(_) => "a dict".into(),
        Value::Global(g) => format!("{g:?}"),
        Value::Storage(_) => "a storage".into(),
        Value::Tensor(_) => "a tensor".into(),
        Value::Object(o) => format!("a {} object", o.borrow().class),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_storages(_: Value) -> Result<Value, String> {
        Err("no persistent ids here".into())
    }

    fn loads(bytes: &[u8]) -> Result<Value, String> {
        load(bytes, bytes.len() as u64, false, &mut no_storages)
    }

    /// `pickle.dumps({"a": [1, -2, 3.5, None, True], "b": ("x", b"yz"), "big": 2**70}, 2)`.
    #[test]
    fn plain_values_of_protocol_2() {
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00bq\x03X\x01\x00\x00\x00xq\x04c_codecs\nencode\nq\x05X\x02\x00\x00\x00yzq\x06X\x06\x00\x00\x00latin1q\x07\x86q\x08Rq\t\x86q\nX\x03\x00\x00\x00bigq\x0b\x8a\t\x00\x00\x00\x00\x00\x00\x00\x00@u.";
        let Value::Dict(d) = loads(bytes).unwrap() else { panic!("not a dict") };
        let d = d.borrow();
        let Some(Value::List(a)) = d.get("a") else { panic!("a") };
        let a = a.borrow();
        assert!(
            matches!(a[..], [Value::Int(1), Value::Int(-2), Value::Float(f), Value::None, Value::Bool(true)] if f == 3.5)
        );
        let Some(Value::Tuple(b)) = d.get("b") else { panic!("b") };
        assert!(
            matches!(&b[..], [Value::Str(x), Value::Bytes(yz)] if &**x == "x" && &**yz == b"yz")
        );
        assert!(matches!(d.get("big"), Some(Value::BigInt(b)) if b.len() == 9 && b[8] == 0x40));
    }

    /// A dict memoised before it is filled and fetched afterwards is the filled one, as in
    /// Python (TorchScript archives reference their modules so).
    #[test]
    fn memoised_containers_are_shared() {
        // EMPTY_LIST BINPUT 0, MARK K1 K2 APPENDS, POP, BINGET 0, STOP
        let v = loads(b"\x80\x02]q\x00(K\x01K\x02e0h\x00.").unwrap();
        let Value::List(l) = v else { panic!("not a list") };
        assert_eq!(l.borrow().len(), 2);
    }

    #[test]
    fn globals_outside_the_allow_list_are_refused_by_name() {
        for (bytes, global) in [
            (&b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."[..], "os.system"),
            (b"\x80\x02cbuiltins\neval\n.", "builtins.eval"),
            (b"\x80\x04\x8c\nsubprocess\x8c\x05Popen\x93.", "subprocess.Popen"),
            (b"\x80\x02c__torch__\nM\n)\x81.", "__torch__.M"),
        ] {
            let err = loads(bytes).unwrap_err();
            assert!(err.contains(&format!("refuses the global {global}")), "{err}");
        }
        // The same class is a module object inside a TorchScript archive.
        let bytes = b"\x80\x02c__torch__\nM\n)\x81}X\x01\x00\x00\x00kK\x05sb.";
        let v = load(&bytes[..], bytes.len() as u64, true, &mut no_storages).unwrap();
        let Value::Object(o) = v else { panic!("not an object") };
        assert_eq!(o.borrow().class, "__torch__.M");
        assert!(matches!(o.borrow().attributes.get("k"), Some(Value::Int(5))));
    }

    /// Forged lengths fail before anything of their size is allocated, and damaged or cut
    /// pickles are errors, never panics.
    #[test]
    fn forged_lengths_and_damage_are_errors() {
        let cases: [&[u8]; 9] = [
            b"\x80\x02\x8e\x00\x00\x00\x00\x00\x01\x00\x00.", // BINBYTES8 of 2^40
            b"\x80\x02X\xff\xff\xff\xff.",                    // BINUNICODE of 4 GiB
            b"\x80\x02\x8b\xff\xff\xff\x7f.",                 // LONG4 of 2 GiB
            b"\x80\x02]K\x01",                                // no STOP
            b"\x80\x02h\x07.",                                // memo never set
            b"\x80\x02u.",                                    // SETITEMS without MARK
            b"\x80\x02(K\x01K\x02d0.",                        // odd dict, then pops past
            b"\x80\x02\xff",                                  // not an opcode
            b"",
        ];
        for bytes in cases {
            assert!(loads(bytes).is_err(), "{bytes:?}");
        }
        let err = loads(cases[0]).unwrap_err();
        assert!(err.contains("1099511627776 bytes") && err.contains("truncated"), "{err}");
    }

    /// A million lists (or tuples) nested in a few megabytes load and drop without
    /// overflowing the stack (this test thread's is 2 MiB), and so does a list holding itself.
    #[test]
    fn deep_nesting_drops_without_recursion() {
        const N: usize = 1_000_000;
        let mut lists = b"\x80\x02".to_vec();
        lists.extend(std::iter::repeat_n(b']', N));
        lists.extend(std::iter::repeat_n(b'a', N - 1));
        lists.push(b'.');
        let mut tuples = b"\x80\x02)".to_vec();
        tuples.extend(std::iter::repeat_n(0x85u8, N));
        tuples.push(b'.');
        for bytes in [lists, tuples] {
            let v = loads(&bytes).unwrap();
            assert!(matches!(v, Value::List(_) | Value::Tuple(_)));
            drop(v);
        }
        // EMPTY_LIST, DUP, APPEND: a list inside itself (left to leak, never recursed into).
        let v = loads(b"\x80\x02]2a.").unwrap();
        let Value::List(l) = &v else { panic!("not a list") };
        assert_eq!(l.borrow().len(), 1);
    }

    #[test]
    fn views_must_lie_inside_their_storage() {
        let storage = Rc::new(StorageRef {
            key: "0".into(),
            kind: StorageKind::of("FloatStorage").unwrap(),
            numel: 6,
        });
        // A 2 x 3 matrix, its last two columns, its transpose: inside.
        assert!(view(storage.clone(), 0, vec![2, 3], vec![3, 1]).is_ok());
        assert!(view(storage.clone(), 1, vec![2, 2], vec![3, 1]).is_ok());
        assert!(view(storage.clone(), 0, vec![3, 2], vec![1, 3]).is_ok());
        assert!(view(storage.clone(), 6, vec![0], vec![1]).is_ok()); // empty, at the end
                                                                     // One element past the end, an offset past it, overflowing sizes, negative strides.
        for (offset, size, stride) in [
            (1, vec![2, 3], vec![3, 1]),
            (7, vec![0], vec![1]),
            (0, vec![1 << 62, 4], vec![1 << 62, 1]),
            (0, vec![2], vec![-1]),
            (0, vec![2, 3], vec![3]),
            (0, vec![1 << 40], vec![0]),
        ] {
            let err = view(storage.clone(), offset, size.clone(), stride).unwrap_err();
            assert!(!err.is_empty(), "{size:?}");
        }
    }
}
