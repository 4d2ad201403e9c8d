//! Where the fields of `struct sk_buff` that the datapath's checksum-offload check reads sit in
//! this kernel, from its BTF (`/sys/kernel/btf/vmlinux`). aya 0.14 relocates no field offsets
//! (no CO-RE), so the agent finds them and hands them to the programs as load-time globals.
//! A small reader of the BTF format (the kernel's `Documentation/bpf/btf.rst`): the type
//! section, structs and unions with their members, anonymous ones looked through.
use std::path::Path;

/// The kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Offsets (bytes) in `struct sk_buff`, as the datapath's globals take them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbOffsets {
    /// `head`; `data` follows it.
    pub head: u32,
    /// `csum_start`.
    pub csum: u32,
    /// The byte that holds the 2-bit bitfield `ip_summed`, and the bit it starts at.
    pub ip_summed: u32,
    pub ip_summed_shift: u32,
}

/// Why the offsets are not known.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("struct sk_buff: {0}")]
    Layout(String),
}

/// The offsets of this kernel, from `path` (normally [`VMLINUX`]).
pub fn skb_offsets(path: &Path) -> Result<SkbOffsets, BtfError> {
    let blob = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let btf = Btf::parse(&blob)?;
    let skb = btf
        .struct_named("sk_buff")
        .ok_or_else(|| BtfError::Layout("not in the BTF".into()))?;
    let find = |name: &str| {
        btf.member(skb, name, 0)
            .ok_or_else(|| BtfError::Layout(format!("no member {name}")))
    };
    let (head, data, start, summed) = (
        find("head")?,
        find("data")?,
        find("csum_start")?,
        find("ip_summed")?,
    );
    let byte = |m: Member| -> Result<u32, BtfError> {
        if !m.bit.is_multiple_of(8) || m.bitfield != 0 {
            return Err(BtfError::Layout("a field that is not byte-aligned".into()));
        }
        Ok(m.bit / 8)
    };
    let (head, data, start) = (byte(head)?, byte(data)?, byte(start)?);
    // The datapath reads both pointers in one go.
    if data != head + 8 {
        return Err(BtfError::Layout(format!(
            "head at {head} and data at {data} are not neighbours"
        )));
    }
    if summed.bitfield != 2 || summed.bit % 8 > 6 {
        return Err(BtfError::Layout(format!(
            "ip_summed is {} bits at bit {}",
            summed.bitfield, summed.bit
        )));
    }
    Ok(SkbOffsets {
        head,
        csum: start,
        ip_summed: summed.bit / 8,
        ip_summed_shift: summed.bit % 8,
    })
}

/// A member found in a struct: its offset from the struct's start in bits, and its bitfield
/// size (0: not a bitfield).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Member {
    bit: u32,
    bitfield: u32,
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One type of the type section.
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// `size`, or the id of a type, by kind.
    size_or_id: u32,
    /// Struct and union members: (name offset, type id, offset).
    members: Vec<(u32, u32, u32)>,
}

struct Btf<'a> {
    /// Types by id; id 0 is `void`.
    types: Vec<Type>,
    strings: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl<'a> Btf<'a> {
    fn parse(b: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        if b.get(..2) != Some(&0xeb9f_u16.to_le_bytes()[..]) {
            return Err(BtfError::Malformed("no BTF magic (or not little-endian)"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types_at = hdr_len + type_off;
        let section = b
            .get(types_at..types_at + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_or_id: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < section.len() {
            let info = u32_at(section, at + 4)?;
            let (vlen, kind) = ((info & 0xffff) as usize, (info >> 24) & 0x1f);
            let mut t = Type {
                name_off: u32_at(section, at)?,
                kind,
                kind_flag: info >> 31 != 0,
                size_or_id: u32_at(section, at + 8)?,
                members: Vec::new(),
            };
            at += 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        t.members.push((
                            u32_at(section, m)?,
                            u32_at(section, m + 4)?,
                            u32_at(section, m + 8)?,
                        ));
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                0..=19 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += extra;
            types.push(t);
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|c| *c == 0).unwrap_or(rest.len())]
    }

    fn struct_named(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name.as_bytes())
            .and_then(|i| u32::try_from(i).ok())
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_id;
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The member `name` of the struct or union `id` (or of an anonymous struct or union in
    /// it), its offset counted from `base` bits.
    fn member(&self, id: u32, name: &str, base: u32) -> Option<Member> {
        let t = self.resolve(id)?;
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        for &(name_off, ty, offset) in &t.members {
            let (bit, bitfield) = if t.kind_flag {
                (offset & 0x00ff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            if name_off == 0 {
                if let Some(m) = self.member(ty, name, base + bit) {
                    return Some(m);
                }
            } else if self.name(name_off) == name.as_bytes() {
                return Some(Member {
                    bit: base + bit,
                    bitfield,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct sk_buff { void *x; union { struct { u8 pad; u8 ip_summed:2 } ;
    /// struct { u8 pad; u8 ip_summed:2 } headers; }; u16 csum_start; u16 csum_offset;
    /// char *head; char *data; }` as the kernel nests it.
    fn blob() -> Vec<u8> {
        let strings =
            b"\0sk_buff\0x\0pad\0ip_summed\0headers\0csum_start\0csum_offset\0head\0data\0u8\0";
        let s = |name: &str| -> u32 {
            let needle = [b"\0", name.as_bytes(), b"\0"].concat();
            u32::try_from(
                strings
                    .windows(needle.len())
                    .position(|w| w == needle.as_slice())
                    .unwrap()
                    + 1,
            )
            .unwrap()
        };
        let mut types = Vec::new();
        let mut ty = |name: u32, kind: u32, flag: bool, vlen: u32, size: u32, extra: &[u32]| {
            types.extend(name.to_le_bytes());
            types.extend((vlen | (kind << 24) | (u32::from(flag) << 31)).to_le_bytes());
            types.extend(size.to_le_bytes());
            for e in extra {
                types.extend(e.to_le_bytes());
            }
        };
        // 1: u8
        ty(s("u8"), KIND_INT, false, 0, 1, &[8]);
        // 2: the anonymous struct with a bitfield (kind_flag: offsets carry the size)
        ty(
            0,
            KIND_STRUCT,
            true,
            2,
            2,
            &[s("pad"), 1, 0, s("ip_summed"), 1, (2 << 24) | 0x0d],
        );
        // 3: the anonymous union of it and `headers`
        ty(0, KIND_UNION, false, 2, 2, &[0, 2, 0, s("headers"), 2, 0]);
        // 4: sk_buff
        ty(
            s("sk_buff"),
            KIND_STRUCT,
            false,
            6,
            40,
            &[
                s("x"),
                1,
                0,
                0,
                3,
                64,
                s("csum_start"),
                1,
                96,
                s("csum_offset"),
                1,
                112,
                s("head"),
                1,
                192,
                s("data"),
                1,
                256,
            ],
        );
        let mut b = Vec::new();
        b.extend(0xeb9f_u16.to_le_bytes());
        b.extend([1, 0]);
        b.extend(24u32.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(u32::try_from(types.len()).unwrap().to_le_bytes());
        b.extend(u32::try_from(types.len()).unwrap().to_le_bytes());
        b.extend(u32::try_from(strings.len()).unwrap().to_le_bytes());
        b.extend(types);
        b.extend(strings);
        b
    }

    #[test]
    fn members_of_anonymous_unions_and_bitfields_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("btf");
        std::fs::write(&path, blob()).unwrap();
        assert_eq!(
            skb_offsets(&path).unwrap(),
            SkbOffsets {
                head: 24,
                csum: 12,
                // Bit 64 + 13: byte 9, bit 5.
                ip_summed: 9,
                ip_summed_shift: 5,
            }
        );
    }

    #[test]
    fn this_kernel_has_them() {
        let o = skb_offsets(Path::new(VMLINUX)).unwrap();
        assert!(o.head > 0 && o.csum > 0 && o.ip_summed > 0, "{o:?}");
    }
}
