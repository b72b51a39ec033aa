"""skproduct quickstart: write a small synthetic catalogue in Cdiscount's BSON layout and read it back.

Runs with nothing but skproduct installed (no data, no internet):

    python examples/quickstart.py
"""

import tempfile
from pathlib import Path

from skproduct import CategoryTree, load_image, read_bson
from skproduct.datasets import make_category_tree, write_synthetic_bson


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="skproduct-quickstart-"))
    tree = make_category_tree((3, 2, 2))
    tree.to_frame().to_csv(folder / "category_names.csv", index=False)
    path = write_synthetic_bson(folder / "train.bson", n_products=200, tree=tree, random_state=0)

    products = read_bson(path)  # scans once, then keeps an offset index beside the file
    tree = CategoryTree.from_csv(folder / "category_names.csv")
    codes = tree.encode(products["category_id"])

    print(f"catalogue: {path}")
    print(f"products: {len(products)}, pictures: {products['n_images'].sum()}, tree levels: {tree.level_sizes}")
    print("products per top-level category:")
    for node, count in zip(tree.nodes(0), (codes[:, 0][:, None] == range(tree.level_sizes[0])).sum(axis=0)):
        print(f"  {' > '.join(node):<10} {count}")
    first = products.iloc[0]
    picture = load_image(first["images"][0])
    print(f"product {first['product_id']} is {' > '.join(tree.path(first['category_id']))}; "
          f"its first picture is {picture.size[0]}x{picture.size[1]} {picture.mode}")
    print("reopening uses the saved index:", len(read_bson(path)) == len(products))


if __name__ == "__main__":
    main()
