//! `text_enum!`: an enum that travels as a fixed set of strings (Avro `string`, JSON string), so a
//! field can be typed in Rust while the wire format stays what readers and kcat already see. It
//! derives `as_str`, `FromStr` (an unknown text is an error naming the valid ones), `Display`,
//! serde as a string, `From<E> for String` and comparison with `&str`.

/// A text that is not one of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}; use one of {expected:?}")]
pub struct UnknownVariant {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

impl UnknownVariant {
    /// Never: the text is what it is.
    pub fn retryable(&self) -> bool {
        false
    }
}

macro_rules! text_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Every value's text, in declaration order.
            pub const TEXTS: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::codec::text_enum::UnknownVariant;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::codec::text_enum::UnknownVariant { kind: stringify!($name), value: s.to_string(), expected: Self::TEXTS }),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(<D::Error as serde::de::Error>::custom)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }
    };
}

pub(crate) use text_enum;

#[cfg(test)]
mod tests {
    text_enum! {
        enum Colour { Red = "RED", DarkBlue = "DARK_BLUE" }
    }

    #[test]
    fn travels_as_its_text_and_refuses_others() {
        assert_eq!(serde_json::to_string(&Colour::DarkBlue).unwrap(), "\"DARK_BLUE\"");
        assert_eq!(serde_json::from_str::<Colour>("\"RED\"").unwrap(), Colour::Red);
        let e = serde_json::from_str::<Colour>("\"GREEN\"").unwrap_err().to_string();
        assert!(e.contains("GREEN") && e.contains("DARK_BLUE"), "{e}");
        assert!(Colour::Red == "RED");
        assert_eq!(String::from(Colour::DarkBlue), "DARK_BLUE");
    }
}
