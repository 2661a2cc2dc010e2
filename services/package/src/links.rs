//! Symbolic links in a package, checked the way the file system will resolve them: one
//! component at a time, against the package's own tree, following every link met on the way.
//!
//! A textual check of a link's target (count the `..`, or fold them into a path) is not
//! enough: `a1/…/a8/y -> ../../../../../../../../c` stays inside, and so does the text of
//! `z -> a1/…/a8/y/../../../../../../../../../etc/passwd`; but the kernel follows `y` first,
//! lands on `c` at the package's top, and the nine `..` after it climb out to `/etc/passwd`.
//! Here each step is taken as the kernel takes it: a component that names a link of the
//! package is replaced by where that link leads (resolved the same way, from the link's own
//! folder), and any `..` above the package's top, any absolute target, and any chain of more
//! than [`MAX_FOLLOWS`] links is refused. The watcher and signer run it on the archive, the
//! agent on the signed manifest before it writes anything.
//!
//! Entries (files and links) must also not be *placed* through a link (`bin -> /usr/bin`
//! then `bin/x`): writing them would write outside the package.

use std::collections::HashMap;

/// Links followed while resolving one path (the kernel's own limit is 40).
pub const MAX_FOLLOWS: u32 = 40;

/// Why a package's link or entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct LinkError {
    /// The entry refused.
    pub path: String,
    pub reason: LinkProblem,
}

/// What is wrong with an entry, as far as links go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkProblem {
    /// The entry would be written through a link (`bin -> /usr/bin`, then `bin/x`).
    #[error("passes through the link {link}")]
    PlacedThrough { link: String },
    #[error("link to {target:?} is not a plain relative path")]
    NotPlain { target: String },
    /// A link to the package's top makes every path below it a loop.
    #[error("link to {target:?} points at the package's top")]
    PackageTop { target: String },
    #[error("link to {target:?} {escape}")]
    Escapes { target: String, escape: Escape },
}

/// How resolving a link's target, component by component, leaves the package.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Escape {
    #[error("the target {target:?} is absolute")]
    Absolute { target: String },
    /// A `..` above the package's top; `via`: the last link followed before it, which is how
    /// a target whose text stays inside gets out.
    #[error(
        "leaves the package{}",
        via.as_ref().map(|link| format!(" (after following the link {link})")).unwrap_or_default()
    )]
    LeavesPackage { via: Option<String> },
    #[error("more than {MAX_FOLLOWS} links in a row (a loop?)")]
    TooManyFollows,
    /// Resolving the target of `link`, met on the way, went wrong.
    #[error("through the link {link} ({target:?}): {escape}")]
    Through {
        link: String,
        target: String,
        escape: Box<Escape>,
    },
}

/// The package's links, by their path.
struct Tree<'a> {
    links: HashMap<&'a str, &'a str>,
}

impl<'a> Tree<'a> {
    /// Where `target`, read from the folder `at` (components below the package's top), leads:
    /// every component walked in turn, every link of the package met on the way followed.
    fn resolve(
        &self,
        mut at: Vec<&'a str>,
        target: &'a str,
        follows: &mut u32,
    ) -> Result<Vec<&'a str>, Escape> {
        if target.starts_with('/') {
            return Err(Escape::Absolute {
                target: target.to_string(),
            });
        }
        // The last link followed on this path, to say how an escape came about.
        let mut via: Option<String> = None;
        for part in target.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if at.pop().is_none() {
                        return Err(Escape::LeavesPackage { via });
                    }
                }
                name => {
                    at.push(name);
                    let here = at.join("/");
                    if let Some(next) = self.links.get(here.as_str()) {
                        *follows += 1;
                        if *follows > MAX_FOLLOWS {
                            return Err(Escape::TooManyFollows);
                        }
                        at.pop();
                        at = self
                            .resolve(at, next, follows)
                            .map_err(|e| Escape::Through {
                                link: here.clone(),
                                target: next.to_string(),
                                escape: Box::new(e),
                            })?;
                        via = Some(here);
                    }
                }
            }
        }
        Ok(at)
    }
}

/// Checks every entry of a package: `(path, link target)` for each, `None` for files and
/// folders. Entry paths are already plain relative paths (no `..`, not absolute): the archive
/// and the manifest check that first.
pub fn check<'a>(
    entries: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<(), LinkError> {
    let entries: Vec<(&str, Option<&str>)> = entries.into_iter().collect();
    let links: HashMap<&str, &str> = entries
        .iter()
        .filter_map(|(path, target)| target.map(|t| (path.trim_end_matches('/'), t)))
        .collect();
    if links.is_empty() {
        return Ok(());
    }
    let tree = Tree { links };
    for (path, _) in &entries {
        let path = path.trim_end_matches('/');
        let parts: Vec<&str> = path.split('/').collect();
        let mut prefix = String::new();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if tree.links.contains_key(prefix.as_str()) {
                return Err(LinkError {
                    path: path.to_string(),
                    reason: LinkProblem::PlacedThrough { link: prefix },
                });
            }
        }
    }
    for (path, target) in &tree.links {
        let refuse = |reason: LinkProblem| LinkError {
            path: path.to_string(),
            reason,
        };
        let target_text = || target.to_string();
        if target.is_empty() || target.contains('\\') || target.contains('\0') {
            return Err(refuse(LinkProblem::NotPlain {
                target: target_text(),
            }));
        }
        let mut folder: Vec<&str> = path.split('/').collect();
        folder.pop();
        let mut follows = 0;
        let resolved = tree
            .resolve(folder, target, &mut follows)
            .map_err(|escape| {
                refuse(LinkProblem::Escapes {
                    target: target_text(),
                    escape,
                })
            })?;
        if resolved.is_empty() {
            return Err(refuse(LinkProblem::PackageTop {
                target: target_text(),
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain of the finding: a link that stays inside, and a second one whose text stays
    /// inside but which, through the first, climbs out to `/etc/passwd`.
    fn escaping_chain() -> Vec<(String, Option<String>)> {
        let deep = "a1/a2/a3/a4/a5/a6/a7/a8";
        vec![
            (format!("{deep}/keep"), None),
            (
                format!("{deep}/y"),
                Some("../../../../../../../../c".to_string()),
            ),
            (
                "z".to_string(),
                Some(format!("{deep}/y/{}etc/passwd", "../".repeat(9))),
            ),
        ]
    }

    fn run(entries: &[(&str, Option<&str>)]) -> Result<(), LinkError> {
        check(entries.iter().copied())
    }

    #[test]
    fn a_chain_of_links_that_climbs_out_is_refused() {
        let chain = escaping_chain();
        let err = check(chain.iter().map(|(p, t)| (p.as_str(), t.as_deref())))
            .expect_err("escapes through y");
        assert_eq!(err.path, "z");
        assert!(
            matches!(&err.reason, LinkProblem::Escapes {
                escape: Escape::LeavesPackage { via: Some(link) }, ..
            } if link == "a1/a2/a3/a4/a5/a6/a7/a8/y"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(
                "leaves the package (after following the link a1/a2/a3/a4/a5/a6/a7/a8/y)"
            ),
            "{err}"
        );

        // Each link alone is fine: y by itself stays inside.
        assert_eq!(
            check(chain[..2].iter().map(|(p, t)| (p.as_str(), t.as_deref()))),
            Ok(())
        );
    }

    #[test]
    fn links_inside_the_package_pass_and_escapes_of_every_kind_are_refused() {
        assert_eq!(
            run(&[
                ("bin/app", None),
                ("bin/current", Some("app")),
                ("lib/app", Some("../bin/current")),
                ("share/x", Some("./../bin/./app")),
                ("dangling", Some("nothing/here")),
            ]),
            Ok(())
        );
        let refused = |entries: &[(&str, Option<&str>)], what: &str| {
            let err = run(entries).expect_err(what);
            assert!(err.to_string().contains(what), "{err}");
        };
        refused(
            &[("bin/shadow", Some("../../etc/shadow"))],
            "leaves the package",
        );
        refused(&[("bin/shadow", Some("/etc/shadow"))], "absolute");
        // A link through a link whose target is absolute.
        refused(
            &[("etc", Some("/etc")), ("x", Some("etc/passwd"))],
            "absolute",
        );
        // Through a link that escapes, even when its own text would look harmless after it.
        refused(
            &[("up", Some("..")), ("x", Some("up/pkg/file"))],
            "leaves the package",
        );
        refused(&[("a", Some("b")), ("b", Some("a"))], "in a row");
        refused(&[("me", Some("."))], "top");
        refused(
            &[("bin", Some("lib")), ("bin/x", None)],
            "passes through the link bin",
        );
        refused(&[("bad", Some(""))], "plain relative");
    }
}
