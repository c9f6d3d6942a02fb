//! Offsets of kernel struct fields, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), for the eBPF programs that read kernel memory directly.
//!
//! Only what the format needs to find a member's byte offset is parsed: the header, the
//! string section and each type's fixed part and trailer.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// Where the running kernel describes its types.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// One member of a struct or union.
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
}

/// One type: its kind, name and (for structs and unions) members; `target` is the type a
/// typedef or qualifier refers to.
struct Type {
    kind: u32,
    name: u32,
    target: u32,
    members: Vec<Member>,
}

/// The kernel's types, enough to find struct members.
pub struct Btf {
    strings: Vec<u8>,
    /// Index 0 is `void`; type ids index this.
    types: Vec<Type>,
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_kernel() -> Result<Self> {
        Self::read(Path::new(VMLINUX))
    }

    fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| {
            format!(
                "cannot read {} (the kernel needs CONFIG_DEBUG_INFO_BTF)",
                path.display()
            )
        })?;
        Self::parse(&data).with_context(|| format!("{}: not BTF this agent reads", path.display()))
    }

    fn parse(data: &[u8]) -> Result<Self> {
        let u16_at = |at: usize| -> Result<u16> {
            Ok(u16::from_le_bytes(
                data.get(at..at + 2).context("truncated")?.try_into()?,
            ))
        };
        let u32_at = |at: usize| -> Result<u32> {
            Ok(u32::from_le_bytes(
                data.get(at..at + 4).context("truncated")?.try_into()?,
            ))
        };
        if u16_at(0)? != MAGIC {
            bail!("bad magic (big-endian BTF is not read)");
        }
        let header_len = u32_at(4)? as usize;
        let type_start = header_len + u32_at(8)? as usize;
        let type_end = type_start + u32_at(12)? as usize;
        let str_start = header_len + u32_at(16)? as usize;
        let str_end = str_start + u32_at(20)? as usize;
        let strings = data.get(str_start..str_end).context("truncated")?.to_vec();

        let mut types = vec![Type {
            kind: 0,
            name: 0,
            target: 0,
            members: Vec::new(),
        }];
        let mut at = type_start;
        while at < type_end {
            let name = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let size_or_type = u32_at(at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfield_offsets = info >> 31 == 1;
            let mut members = Vec::new();
            let trailer = match kind {
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(m + 8)?;
                        members.push(Member {
                            name: u32_at(m)?,
                            type_id: u32_at(m + 4)?,
                            bit_offset: if bitfield_offsets {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    vlen * 12
                }
                // int, var, decl_tag: one u32; array: three.
                1 | 14 | 17 => 4,
                3 => 12,
                // enum, func_proto: two u32 per entry; datasec, enum64: three.
                6 | 13 => vlen * 8,
                15 | 19 => vlen * 12,
                // ptr, fwd, typedef, qualifiers, func, float, type_tag: nothing.
                2 | 7..=12 | 16 | 18 => 0,
                other => bail!("unknown BTF kind {other}"),
            };
            at += trailer;
            types.push(Type {
                kind,
                name,
                target: size_or_type,
                members,
            });
        }
        Ok(Self { strings, types })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let tail = self.strings.get(offset as usize..).unwrap_or_default();
        tail.split(|b| *b == 0).next().unwrap_or_default()
    }

    /// The byte offset of `member` in `struct strukt`, looking into anonymous structs and
    /// unions; `None` if this kernel's struct has no such member.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<Option<u32>> {
        let id = self
            .types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && self.name(t.name) == strukt.as_bytes())
            .with_context(|| format!("the kernel has no struct {strukt}"))?;
        Ok(self
            .find(id, member.as_bytes())
            .map(|bits| (bits / 8) as u32))
    }

    fn find(&self, id: usize, member: &[u8]) -> Option<usize> {
        let t = &self.types[id];
        t.members.iter().find_map(|m| {
            if self.name(m.name) == member {
                return Some(m.bit_offset as usize);
            }
            if m.name != 0 {
                return None;
            }
            let inner = self.resolve(m.type_id as usize)?;
            self.find(inner, member)
                .map(|bits| m.bit_offset as usize + bits)
        })
    }

    /// The struct or union a type id stands for, through typedefs and qualifiers.
    fn resolve(&self, mut id: usize) -> Option<usize> {
        for _ in 0..16 {
            let t = self.types.get(id)?;
            match t.kind {
                KIND_STRUCT | KIND_UNION => return Some(id),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.target as usize;
                }
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_members_of_the_running_kernel() {
        let btf = Btf::from_kernel().unwrap();
        // `struct sock` begins with `struct sock_common __sk_common`.
        assert_eq!(btf.member_offset("sock", "__sk_common").unwrap(), Some(0));
        // A member inside an anonymous union of sock_common.
        let family = btf.member_offset("sock_common", "skc_family").unwrap();
        assert!(family.is_some_and(|o| o > 0 && o < 64), "{family:?}");
        let user_data = btf.member_offset("sock", "sk_user_data").unwrap();
        let rcvbuf = btf.member_offset("sock", "sk_rcvbuf").unwrap();
        assert!(user_data.is_some() && rcvbuf.is_some());
        assert_ne!(user_data, rcvbuf);
        assert_eq!(btf.member_offset("sock", "no_such_member").unwrap(), None);
        assert!(btf.member_offset("no_such_struct", "x").is_err());
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(Btf::parse(b"not btf at all, but long enough").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0]).is_err());
    }
}
