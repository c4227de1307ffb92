//! Replica arithmetic of a rollout, as upstream computes it: the surge and
//! unavailability budgets, the new ReplicaSet's next size, and how a
//! Deployment scaled mid-rollout spreads the change over its ReplicaSets.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// An absolute count, or a percent of `total` rounded up or down.
pub fn scaled(value: &IntOrString, total: i32, round_up: bool) -> Result<i32, String> {
    match value {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::String(s) => {
            let percent: i64 = s
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| {
                    format!("invalid value {s:?}: must be an integer or a percentage")
                })?;
            let product = percent * i64::from(total);
            let value = if round_up {
                product.div_euclid(100) + i64::from(product.rem_euclid(100) != 0)
            } else {
                product.div_euclid(100)
            };
            i32::try_from(value).map_err(|_| format!("{s:?} of {total} is out of range"))
        }
    }
}

/// `(maxSurge, maxUnavailable)` for `desired` replicas; both zero would
/// never make progress, so unavailability becomes one.
pub fn fenceposts(
    max_surge: Option<&IntOrString>,
    max_unavailable: Option<&IntOrString>,
    desired: i32,
) -> Result<(i32, i32), String> {
    let zero = IntOrString::Int(0);
    let surge = scaled(max_surge.unwrap_or(&zero), desired, true)?;
    let unavailable = scaled(max_unavailable.unwrap_or(&zero), desired, false)?;
    Ok(if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    })
}

/// The new ReplicaSet's size in a rolling update: grow within the surge
/// budget (`all` is the spec total of every ReplicaSet), never past
/// `desired`.
pub fn rolling_new_size(desired: i32, surge: i32, all: i32, new: i32) -> i32 {
    let max_total = desired + surge;
    if all >= max_total {
        return new;
    }
    new + (max_total - all).min(desired - new)
}

/// New sizes for active ReplicaSets `(replicas, max-replicas annotation)`,
/// given in upstream's order (largest first; on ties newer first when
/// growing, older first when shrinking), when the Deployment now wants
/// `desired` replicas. `status_replicas` stands in for a missing annotation.
pub fn spread(
    sets: &[(i32, Option<i32>)],
    desired: i32,
    surge: i32,
    status_replicas: i32,
) -> Vec<i32> {
    let total: i32 = sets.iter().map(|s| s.0).sum();
    let allowed = if desired > 0 { desired + surge } else { 0 };
    let to_add = allowed - total;
    let mut added = 0;
    let mut sizes: Vec<i32> = sets
        .iter()
        .map(|&(replicas, annotated)| {
            if to_add == 0 {
                return replicas;
            }
            let share = proportion(
                replicas,
                annotated.unwrap_or(status_replicas),
                desired,
                surge,
                to_add,
                added,
            );
            added += share;
            replicas + share
        })
        .collect();
    if to_add != 0
        && let Some(first) = sizes.first_mut()
    {
        // Rounding leftovers go to the largest set.
        *first = (*first + to_add - added).max(0);
    }
    sizes
}

/// One set's share of `to_add`: its size scaled from the Deployment's old
/// maximum (`annotated`) to the new one, capped by what is left to add.
fn proportion(
    replicas: i32,
    annotated: i32,
    desired: i32,
    surge: i32,
    to_add: i32,
    added: i32,
) -> i32 {
    if replicas == 0 || to_add == 0 || to_add == added {
        return 0;
    }
    let fraction = if desired == 0 {
        -replicas
    } else if annotated == 0 {
        0
    } else {
        let size = f64::from(replicas) * f64::from(desired + surge) / f64::from(annotated);
        size.round() as i32 - replicas
    };
    let allowed = to_add - added;
    if to_add > 0 {
        fraction.min(allowed)
    } else {
        fraction.max(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct(s: &str) -> IntOrString {
        IntOrString::String(s.into())
    }

    #[test]
    fn percents_round_as_upstream() {
        assert_eq!(scaled(&pct("25%"), 3, true), Ok(1));
        assert_eq!(scaled(&pct("25%"), 3, false), Ok(0));
        assert_eq!(scaled(&pct("25%"), 4, true), Ok(1));
        assert_eq!(scaled(&pct("50%"), 5, false), Ok(2));
        assert_eq!(scaled(&IntOrString::Int(2), 10, true), Ok(2));
        assert!(scaled(&pct("5"), 10, true).is_err());
        // Defaults of a 3-replica Deployment: surge 1, unavailable 0.
        assert_eq!(
            fenceposts(Some(&pct("25%")), Some(&pct("25%")), 3),
            Ok((1, 0))
        );
        // Both zero: one may be unavailable.
        assert_eq!(
            fenceposts(Some(&pct("0%")), Some(&IntOrString::Int(0)), 3),
            Ok((0, 1))
        );
    }

    #[test]
    fn new_set_grows_within_the_surge() {
        assert_eq!(rolling_new_size(3, 1, 3, 0), 1);
        assert_eq!(rolling_new_size(3, 1, 4, 1), 1);
        assert_eq!(rolling_new_size(10, 3, 10, 0), 3);
        assert_eq!(rolling_new_size(3, 5, 3, 0), 3);
    }

    #[test]
    fn scaling_mid_rollout_is_proportional() {
        // Upstream's documented example: 10 replicas, maxSurge 3, old set
        // at 8 and new at 5, scaled to 15 (surge still 3): 3 more go to the
        // old set, 2 to the new.
        assert_eq!(
            spread(&[(8, Some(13)), (5, Some(13))], 15, 3, 13),
            vec![11, 7]
        );
        // Scaled down to 5 (surge 3): 8 in all, in proportion.
        assert_eq!(
            spread(&[(8, Some(13)), (5, Some(13))], 5, 3, 13),
            vec![5, 3]
        );
        // To zero: everything goes.
        assert_eq!(
            spread(&[(8, Some(13)), (5, Some(13))], 0, 0, 13),
            vec![0, 0]
        );
    }
}
