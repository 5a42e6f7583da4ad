//! NUMA nodes as sysfs shows them (`/sys/devices/system/node`).

const NODES: &str = "/sys/devices/system/node";

/// Node numbers of a kernel node list such as `0-1,3`.
fn parse_list(list: &str) -> Option<Vec<u32>> {
    let mut nodes = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last): (u32, u32) = match part.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let n = part.parse().ok()?;
                (n, n)
            }
        };
        nodes.extend(first..=last);
    }
    Some(nodes)
}

/// Checks that `node` is a NUMA node with memory, so a pool can be bound to it.
pub fn check_node(node: u32) -> Result<(), String> {
    let path = format!("{NODES}/has_memory");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {path} (a kernel without NUMA?): {e}"))?;
    let nodes = parse_list(&text).ok_or_else(|| format!("{path}: cannot parse {text:?}"))?;
    if nodes.contains(&node) {
        Ok(())
    } else {
        Err(format!(
            "NUMA node {node} has no memory; nodes with memory: {} ({path})",
            text.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_lists() {
        assert_eq!(parse_list("0\n"), Some(vec![0]));
        assert_eq!(parse_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("x"), None);
    }
}
