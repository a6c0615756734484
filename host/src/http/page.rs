//! Paging (rule 5): pages are 1-based, and every page carries `pageNumber`,
//! `pageSize`, `total` and `records`.

use serde::Serialize;

/// Largest page served.
pub const MAX_PAGE_SIZE: u32 = 1000;

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub page_number: u32,
    pub page_size: u32,
    pub total: usize,
    pub records: Vec<T>,
}

/// Checks the page request, naming the field that is off.
pub fn check(page_number: u32, page_size: u32) -> Result<(), String> {
    if page_number == 0 {
        return Err("pageNumber: pages start at 1".into());
    }
    if page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(format!("pageSize: 1-{MAX_PAGE_SIZE}"));
    }
    Ok(())
}

/// The page `page_number` of `items`, each turned into its record by `view`.
pub fn of<I, T>(
    items: impl ExactSizeIterator<Item = I>,
    page_number: u32,
    page_size: u32,
    view: impl FnMut(I) -> T,
) -> Page<T> {
    let total = items.len();
    let skip = (page_number as usize - 1).saturating_mul(page_size as usize);
    Page {
        page_number,
        page_size,
        total,
        records: items
            .skip(skip)
            .take(page_size as usize)
            .map(view)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_one_based_and_report_the_total() {
        let page = of(1..46, 3, 20, |n| n);
        assert_eq!(
            (page.total, page.records.clone()),
            (45, (41..=45).collect::<Vec<_>>())
        );
        assert!(of(1..6, 9, 20, |n| n).records.is_empty());
        assert!(check(0, 20).unwrap_err().contains("pageNumber"));
        assert!(check(1, 0).unwrap_err().contains("pageSize"));
        assert!(check(1, 20).is_ok());
    }
}
