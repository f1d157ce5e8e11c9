//! The command line of the tools the tests run inside the testbed (`probe`, `forge`): a mode,
//! then `--key value` options and valueless `--flag`s.

use std::collections::HashMap;
use std::str::FromStr;

pub struct Args {
    pub mode: String,
    opts: HashMap<String, String>,
    flags: Vec<String>,
}

impl Args {
    /// `args` (without the program's name): the mode, then the options; those named in
    /// `flags` take no value.
    pub fn parse(mut args: impl Iterator<Item = String>, flags: &[&str]) -> Result<Args, String> {
        let mode = args.next().ok_or("missing mode")?;
        let (mut opts, mut set) = (HashMap::new(), Vec::new());
        while let Some(a) = args.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {a:?}"))?;
            if flags.contains(&key) {
                set.push(key.to_string());
            } else {
                let v = args
                    .next()
                    .ok_or_else(|| format!("--{key} needs a value"))?;
                opts.insert(key.to_string(), v);
            }
        }
        Ok(Args {
            mode,
            opts,
            flags: set,
        })
    }

    /// The value of `--key`, if given.
    pub fn get<T: FromStr>(&self, key: &str) -> Result<Option<T>, String> {
        self.opts
            .get(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| format!("invalid value for --{key}: {v:?}"))
            })
            .transpose()
    }

    /// The value of `--key`, which must be given.
    pub fn req<T: FromStr>(&self, key: &str) -> Result<T, String> {
        self.get(key)?.ok_or_else(|| format!("--{key} is required"))
    }

    /// Whether flag `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str, flags: &[&str]) -> Result<Args, String> {
        Args::parse(line.split_whitespace().map(str::to_owned), flags)
    }

    #[test]
    fn modes_options_and_flags() {
        let a = parse("serve --port 80 --echo --bind ::1", &["echo"]).unwrap();
        assert_eq!(a.mode, "serve");
        assert_eq!(a.req::<u16>("port"), Ok(80));
        assert_eq!(a.get::<String>("bind"), Ok(Some("::1".into())));
        assert_eq!(a.get::<u16>("seconds"), Ok(None));
        assert!(a.flag("echo") && !a.flag("delete"));
        assert!(a.req::<u16>("seconds").is_err());
        assert!(a.get::<u8>("port").is_ok() && a.get::<bool>("port").is_err());
        // Not a flag here: it needs a value.
        assert!(parse("serve --echo", &[]).is_err());
        assert!(parse("serve port 80", &[]).is_err());
        assert!(parse("", &[]).is_err());
    }
}
